//! A failed EC2 request, as the pollers report it and back off from it.

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata};

/// A failed EC2 request.
#[derive(Debug, thiserror::Error)]
#[error("{operation}: {message}")]
pub struct Ec2Error {
    pub operation: &'static str,
    /// The EC2 error code (`RequestLimitExceeded`, `UnauthorizedOperation`, …).
    pub code: Option<String>,
    pub message: String,
}

impl Ec2Error {
    pub(super) fn new<E>(operation: &'static str, error: E) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        Self {
            operation,
            code: error.code().map(str::to_string),
            message: DisplayErrorContext(&error).to_string(),
        }
    }

    /// EC2's API throttling: back off exponentially.
    pub fn is_throttling(&self) -> bool {
        self.code.as_deref() == Some("RequestLimitExceeded")
    }
}
