"""The local stack runner: ``python -m services.tools.stack keys|up|down|status|probe``.

Tests use the Python API::

    stack = Stack.on_free_ports(root, tmp_path / "run", {"SIM_TIME_SCALE": "0.05"})
    keys = stack.start(timeout_s=120)     # returns once every service is SERVING
    ...  stack.router_address, keys.key_for("tenant-a"), keys.internal_token
    stack.stop()
"""

from services.tools.keys import StackKeys, ensure_keys
from services.tools.stack.lifecycle import Stack, StackError
from services.tools.stack.service_table import SERVICES, ServiceDef

__all__ = ["SERVICES", "ServiceDef", "Stack", "StackError", "StackKeys", "ensure_keys"]
