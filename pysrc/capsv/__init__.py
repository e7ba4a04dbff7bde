"""Speaker verification with Cross Attentive Pooling (CAP): the Python side of the recipe."""
