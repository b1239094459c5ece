//! The NB-IoT gateway.
