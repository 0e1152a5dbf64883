"""Privacy by design: pseudonymous ids, minimal attributes, erasure and access for the people in the data."""
