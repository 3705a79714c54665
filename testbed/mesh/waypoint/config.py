"""The waypoint's L7 configuration file: HTTP routes and L7 authorization policies (YAML,
camelCase keys). Services, workloads and endpoints come from the mesh config ztunnel uses.

    routes:
    - name: reviews
      parents: [default/reviews.default.svc.cluster.local]
      rules:
      - matches: [{path: {type: PathPrefix, value: /v2}}]
        backends: [{service: default/reviews-v2.default.svc.cluster.local, weight: 80}, ...]
        timeout: 1.5
        retry: {attempts: 2, retryOn: [5xx, connect-failure]}
        fault: {delay: {fixedDelay: 2.0, percentage: 100}}
    policies:
    - name: no-admin
      action: DENY
      targets: [default/reviews.default.svc.cluster.local]
      rules: [{to: [{paths: [/admin*]}]}]
    appProtocols:                 # declared Service port protocols (testbed.mesh.appprotocol)
      default/ratings.default.svc.cluster.local: {9080: http}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from testbed.mesh.appprotocol import AppProtocol
from testbed.mesh.config import ConfigError
from testbed.mesh.waypoint.l7authz import L7Policy
from testbed.mesh.waypoint.routing import HttpRoute

ServicePort = Annotated[int, Field(ge=1, le=65535)]


class WaypointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    routes: list[HttpRoute] = []
    policies: list[L7Policy] = []
    # "<ns>/<hostname>" -> service port -> its declared appProtocol; undeclared: sniffed
    app_protocols: dict[str, dict[ServicePort, AppProtocol]] = Field(
        default={},
        validation_alias=AliasChoices("appProtocols", "app_protocols"),
        serialization_alias="appProtocols",
    )

    @classmethod
    def load(cls, path: Path) -> WaypointConfig:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc
        try:
            return cls.model_validate(data or {})
        except ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    def dump_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return yaml.safe_dump(data, sort_keys=False)
