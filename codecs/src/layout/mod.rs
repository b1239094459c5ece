//! PLACEHOLDER — the declarative layout codec is being written; replace this whole module.
