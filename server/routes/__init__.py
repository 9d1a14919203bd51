"""HTTP routes: thin handlers that validate, hand work to the engines and shape responses."""
