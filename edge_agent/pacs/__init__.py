"""Results back into the site's PACS (issue 15), in two parts:

    sr.py   one DICOM Structured Report (TID 1500 Measurement Report, Enhanced SR) per study
            result, built with highdicom from the result and its source instances' headers
    scu.py  C-ECHO and C-STORE to the PACS (pynetdicom SCU), with a clear reason for a refusal

The SR carries the patient and study modules of the source images: it goes only to the site's
own PACS, never to MQTT.
"""
