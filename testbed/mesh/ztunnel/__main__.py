"""`python -m testbed.mesh.ztunnel --config FILE --certs DIR --zds-socket PATH --node NAME`"""

from __future__ import annotations

from testbed.mesh.ztunnel.app import Ztunnel
from testbed.mesh.ztunnel.process import main

if __name__ == "__main__":
    main("testbed.mesh.ztunnel", Ztunnel, {"zds-socket": "the node agent's ZDS socket"}, __doc__)
