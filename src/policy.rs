//! The NetworkPolicy engine.
