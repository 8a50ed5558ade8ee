"""Plain-PyTorch references: the spec of every op, the ground truth of the tests and the speed baseline."""
