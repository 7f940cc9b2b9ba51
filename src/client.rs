//! A blocking client (std::net, no runtime) on the sans-IO codec.
