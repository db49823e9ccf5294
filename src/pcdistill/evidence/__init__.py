"""Evidence: the accuracy suite, the ablations and the bucket analysis behind the README's results."""
