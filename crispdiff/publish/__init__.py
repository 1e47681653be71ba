"""A trained model out: the saved pipeline folder and the Hub (attaching an SR model: ``crispdiff.superres.load``)."""
