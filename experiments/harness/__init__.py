"""What the benchmarks and the tests share to put a client in front of a server: a ``djinn-server``
child process (``server_process``), a link with a fixed latency on loopback (``latency_proxy``),
and a counter of the rpyc requests an action sends (``round_trips``). Libraries, not scripts."""
