"""IR helpers the passes share: model I/O, the node builder, constants, graph walks, symbolic
shapes, sample inputs. They read and edit ``onnx_ir`` graphs and know nothing of any pass."""
