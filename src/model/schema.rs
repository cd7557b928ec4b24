//! The fields the API knows, to reject unknown or misspelled ones that k8s-openapi would drop.
