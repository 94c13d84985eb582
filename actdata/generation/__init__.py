"""Generation: row sources (a model over text, synthetic rows, store replay) and the loop that writes them."""
