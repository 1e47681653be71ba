"""A trained model out: the saved pipeline folder, the super-resolution post-step inside it, the Hub."""
