//! vswitch: the vhost-user-net L2 switch. Empty until the vswitch issue fills it; the
//! crate exists so the workspace layout already shows both daemons.
