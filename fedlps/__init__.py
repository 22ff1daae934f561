"""FedLPS: learnable personalised sparsification with the P-UCBV bandit."""
