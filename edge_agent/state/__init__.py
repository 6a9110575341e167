"""The state database, one module per concern; :class:`edge_agent.store.Store` is the facade
that owns the connections and the transactions and calls these modules' functions (each
takes a connection, in the caller's transaction).

* :mod:`.schema`: the tables, their migrations and versions (the only place that knows them);
* :mod:`.database`: opening, integrity, what a failure means, setting a damaged file aside;
* :mod:`.files`, :mod:`.studies`: files read, instances and their studies;
* :mod:`.alerts`: results and the urgent alerts they raise (acks, re-notification);
* :mod:`.narratives`: draft narratives to write and their outcome as the next revision;
* :mod:`.outbox`: messages waiting for the broker, their order and the cap;
* :mod:`.meta`: the database's keys and the agent's counters;
* :mod:`.report`: the figures ``P/status``, ``edge-agent status`` and ``/metrics`` show.
"""
