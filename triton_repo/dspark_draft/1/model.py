"""dspark_draft: the DSpark drafter graphs over slot-addressed context caches, reached by BLS."""
import triton_python_backend_utils as pb_utils

from dspark_trt.serving.bls_services import DraftService, service_model

TritonPythonModel = service_model(DraftService, pb_utils)
