"""Low-rank factorization: the SVD/Tucker decompositions (lowrank) and the registered ``lowrank`` method."""
