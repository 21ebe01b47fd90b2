"""Implementation of the image-encoder registry (see :mod:`dkan.nn.image_encoders`)."""
