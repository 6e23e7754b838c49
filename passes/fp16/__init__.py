"""The ``fp16clip`` pass (``masks``, ``calibration``) and the fp16 simulation used to check it."""
