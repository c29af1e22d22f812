"""A device's round, free of any transport: the torch learner, the torch-free state and checks."""
