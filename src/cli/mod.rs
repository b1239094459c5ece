//! The subcommands of the `nbiot-gateway` binary. (Being written by the lead.)
