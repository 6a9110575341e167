"""Reading DICOM, in one place: what every stage that opens an instance file shares.

    uid.py            the UID rule (PS3.5 9.1, read tolerantly): UIDs from files, peers, CSVs
    instance_file.py  opening an instance file safely (no link followed, a regular file only,
                      the one the watcher saw) and reading its dataset, checked to hold the
                      SOP Instance UID recorded
    errors.py         one table of what pydicom and its pixel decoders raise on bad data, and
                      :func:`~edge_agent.dicom.errors.reading`, which turns those into
                      :class:`~edge_agent.errors.InputRejected` with a short, PHI-free reason

The header reader (:mod:`edge_agent.intake.header`), pixel decoding (:mod:`edge_agent.imaging`),
CT (:mod:`edge_agent.ct`), scoring, narratives, the C-STORE receiver and ``edge-export probe``
all read through these. Nothing is imported here: ``uid`` is light (the config imports it
through :mod:`edge_agent.identifiers`), the others import pydicom.
"""
