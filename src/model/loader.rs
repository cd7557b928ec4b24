//! Loads a clusterset directory: one subdirectory per cluster, holding manifests.
