//! prfaas node: the model engine (`engine`, `kv`) and, later, the actix serving node.
