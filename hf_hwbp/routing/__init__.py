"""Routing of what a block reads and emits besides the residual stream (docs/algorithm.md, side inputs and outputs).

``forward`` finds side inputs and side outputs in a layer's arguments and outputs while the forward is recorded;
``backward`` sends the gradients of side outputs and of tensors a block hands on to where the definition says, in
the Highway backward.
"""
