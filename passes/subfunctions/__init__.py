"""The ``subfunctions`` pass: each repeated decoder layer becomes a call of one ONNX function.

``regions`` finds each layer's nodes, ``signature`` writes a region in a canonical form (two
layers are the same kind when their forms are equal), ``outline`` builds one function per kind
and replaces every layer of that kind by a call, ``checks`` holds what the Cloud AI compiler
needs inside functions."""
