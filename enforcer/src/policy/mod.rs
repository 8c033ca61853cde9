//! What the security groups decide, in userspace: the reference evaluator (the
//! oracle), the connection tracker's model, and the two readings of them for
//! people, `explain` and `lint`.

pub mod eval;
pub mod explain;
pub mod flow;
pub mod lint;
