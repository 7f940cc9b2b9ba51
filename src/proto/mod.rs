//! Sans-IO protocol layer.
