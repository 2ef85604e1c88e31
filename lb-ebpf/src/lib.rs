//! Empty library target: lets `lb-agent` list this crate as a build-dependency so cargo rebuilds
//! the agent (and re-embeds the object) whenever the programs change.
#![no_std]
