//! The request body of the client: the whole payload in memory, handed to hyper in chunks so a
//! caller can show upload progress (bytes are counted as hyper takes them for the connection,
//! which HTTP/2 flow control and the socket buffer keep close to what was sent).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

/// Called with the size of every chunk handed to the connection.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

const CHUNK: usize = 256 * 1024;

/// A streamed body's error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body produced as it is sent (e.g. a file, or a request being forwarded).
pub type StreamBody = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

pub struct ReqBody {
    data: Bytes,
    progress: Option<Progress>,
    stream: Option<StreamBody>,
}

impl ReqBody {
    pub fn new(data: Bytes, progress: Option<Progress>) -> ReqBody {
        ReqBody {
            data,
            progress,
            stream: None,
        }
    }

    /// A body sent as `stream` yields it (no length known in advance).
    pub fn streaming(stream: StreamBody) -> ReqBody {
        ReqBody {
            data: Bytes::new(),
            progress: None,
            stream: Some(stream),
        }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(s) = this.stream.as_mut() {
            return s.as_mut().poll_frame(cx);
        }
        if this.data.is_empty() {
            return Poll::Ready(None);
        }
        let n = this.data.len().min(CHUNK);
        let chunk = this.data.split_to(n);
        if let Some(p) = &this.progress {
            p(n as u64);
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        match &self.stream {
            Some(s) => s.is_end_stream(),
            None => self.data.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.stream {
            Some(s) => s.size_hint(),
            None => SizeHint::with_exact(self.data.len() as u64),
        }
    }
}
