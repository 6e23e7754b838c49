"""qeff.common: helpers every stage may import (one onnxruntime session factory, one atomic
writer, one progress bar). Nothing here imports a stage."""
