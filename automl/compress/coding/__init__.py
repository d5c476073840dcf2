"""Storage formats of compressed weights: Huffman coding and the Deep Compression / packed low-bit files."""
