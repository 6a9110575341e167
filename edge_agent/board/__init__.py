"""The triage board: the web page where radiographers and radiologists see every box's results.

``edge-agent board`` subscribes to the study results, status and rejected files of every box
under ``mqtt.topic_prefix``, keeps them in its own SQLite file and serves a worklist that
updates live (server-sent events) to logged-in users, who acknowledge urgent results from it.

    subscriber.py   MQTT: persistent session, topics parsed and checked, acks published
    store.py        SQLite: latest row per study, every revision, boxes, rejects, audit log
    worklist.py     a stored result as the row the page shows, and the worklist's order
    auth.py         accounts file (argon2), sessions, CSRF tokens, login rate limit, proxy
    events.py       fan-out of new rows to the open pages (one queue per stream)
    app.py          the Starlette application: login, page, stream, ack, search
    server.py       composition: builds the parts and runs uvicorn

Everything a box sends is data: the page builds its rows with ``textContent`` only, under a
Content-Security-Policy that allows no inline script.
"""
