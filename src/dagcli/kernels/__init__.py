"""The math of the samplers as pure functions of tensors: Gaussian densities and noise (`gaussian`), the DDIM
step and its backward kernel (`ddim`). A model family wires a pipeline's modules to these; nothing here knows
a model."""
