"""The U-Net's shape in two numbers: its depth and the multiple its input sides must be.

A leaf without Keras, so that tiling and figures read them without loading TensorFlow; model.py builds
the network from them and re-exports them.
"""

DEPTH = 4  # pooling steps: five contracting blocks, four expanding blocks
SIZE_MULTIPLE = 2**DEPTH  # with 'same' padding, input sides must divide by this many pixels
