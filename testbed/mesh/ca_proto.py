"""The messages of Istio's CA protocol, built with protobuf's runtime descriptor API.

Istio's certificate service (istio/api security/v1alpha1/ca.proto, package `istio.v1.auth`),
written out here field by field instead of generated, so there is no build step:

    message IstioCertificateRequest {
      string csr = 1;                       // PEM-encoded certificate signing request
      int64 validity_duration = 3;          // requested lifetime, in seconds
      google.protobuf.Struct metadata = 4;  // e.g. ImpersonatedIdentity (Istio's ztunnel)
    }
    message IstioCertificateResponse {
      repeated string cert_chain = 1;       // PEM certificates: leaf first, root last
    }
    service IstioCertificateService {
      rpc CreateCertificate(IstioCertificateRequest) returns (IstioCertificateResponse);
    }
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
CREATE_CERTIFICATE = "CreateCertificate"
METHOD_PATH = f"/{SERVICE}/{CREATE_CERTIFICATE}"
# The request metadata key with which Istio's ztunnel asks for a workload's certificate.
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"

_Field = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(
        name="testbed/mesh/istio_ca.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=[struct_pb2.DESCRIPTOR.name],
    )
    request = file.message_type.add(name="IstioCertificateRequest")
    request.field.add(name="csr", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_OPTIONAL)
    request.field.add(
        name="validity_duration", number=3, type=_Field.TYPE_INT64, label=_Field.LABEL_OPTIONAL
    )
    request.field.add(
        name="metadata",
        number=4,
        type=_Field.TYPE_MESSAGE,
        type_name=".google.protobuf.Struct",
        label=_Field.LABEL_OPTIONAL,
    )
    response = file.message_type.add(name="IstioCertificateResponse")
    response.field.add(
        name="cert_chain", number=1, type=_Field.TYPE_STRING, label=_Field.LABEL_REPEATED
    )
    service = file.service.add(name="IstioCertificateService")
    service.method.add(
        name=CREATE_CERTIFICATE,
        input_type=f".{PACKAGE}.IstioCertificateRequest",
        output_type=f".{PACKAGE}.IstioCertificateResponse",
    )
    return file


def _message_class(pool: descriptor_pool.DescriptorPool, name: str) -> Any:
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))


# The default pool already holds google/protobuf/struct.proto (imported above), so the
# metadata field is the ordinary struct_pb2.Struct.
_POOL = descriptor_pool.Default()
_POOL.AddSerializedFile(_file().SerializeToString())
IstioCertificateRequest: Any = _message_class(_POOL, "IstioCertificateRequest")
IstioCertificateResponse: Any = _message_class(_POOL, "IstioCertificateResponse")
