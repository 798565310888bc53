"""The service around a node: systemd integration and signals (``service``), the control API (``api``,
``auth``), optional HTTP for metrics and the dashboard (``web``, ``metrics``), logging (``logs``) and
config reload (``reload``)."""
