"""dspark_target: the target graph over a slot-addressed K/V pool, reached from dspark_bls by BLS."""
import triton_python_backend_utils as pb_utils

from dspark_trt.serving.bls_services import TargetService, service_model

TritonPythonModel = service_model(TargetService, pb_utils)
