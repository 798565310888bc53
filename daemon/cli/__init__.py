"""The client side: the ``meshtrain`` command line, its control-API client, rendering, ``doctor``, and
the local cluster harness (tests, demos). Nothing here imports the node: it talks to daemons over their
control sockets."""
