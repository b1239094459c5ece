//! The gateway's configuration. (Being written by the lead — the HTTP part below is the
//! contract the API builds against.)

use std::net::SocketAddr;

use serde::Deserialize;

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Bearer tokens. None configured = open, and then only on a loopback address.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            tokens: Vec::new(),
        }
    }
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// `[[http.tokens]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub token: String,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Admin,
}
