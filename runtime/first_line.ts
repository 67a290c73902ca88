/**
 * Reading one line from a child's stdout, shared by the adapters.
 *
 * @module
 */

/**
 * Read from `stream` until the first newline and return the text before it
 * (or everything, if the stream ends first). The stream is released, not
 * cancelled, so the child can go on writing to a pipe nobody reads.
 *
 * @param stream The child's standard output.
 * @returns The first line, without its newline.
 */
export async function readFirstLine(stream: ReadableStream<Uint8Array>): Promise<string> {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let text = "";
  try {
    while (!text.includes("\n")) {
      const { value, done } = await reader.read();
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    reader.releaseLock();
  }
  const nl = text.indexOf("\n");
  return nl >= 0 ? text.slice(0, nl) : text;
}
