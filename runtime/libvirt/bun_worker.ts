/**
 * The body of the Bun workers that run `virDomainBlockPeek` for the main
 * thread.
 *
 * bun:ffi calls are synchronous, so peeks run in workers, off the server's
 * event loop. The main thread sends the domain pointer and the address of
 * the destination buffer (pointers are valid in every thread of a process;
 * the main thread keeps both alive until the reply). The call and the error
 * lookup run on the same thread, so `virGetLastErrorMessage` is exactly
 * this call's message.
 *
 * The worker is started from this function's source text (a Blob URL), not
 * from a file: a file would have to be found again inside `bun build
 * --compile` executables and npm builds. So the function must not use
 * anything from outside its own body; the symbol table comes in the first
 * message.
 *
 * @module
 */

/** The first message: what to load. */
export interface PeekInit {
  soname: string;
  symbols: Record<string, { args: string[]; returns: string }>;
}

/** A peek the main thread asks for. */
export interface PeekRequest {
  id: number;
  dom: number;
  disk: string;
  offset: number;
  size: number;
  buf: number;
}

/** The answer: `message` is set when the peek failed; id 0 means "ready". */
export interface PeekReply {
  id: number;
  message?: string;
  code?: number;
}

/** The worker's code; runs in the worker, started as `(${peekWorker})()`. */
export function peekWorker(): void {
  interface Lib {
    virDomainBlockPeek(
      d: number,
      n: Uint8Array,
      o: number,
      s: number,
      b: number,
      f: number,
    ): number;
    virGetLastErrorMessage(): number | null;
    virGetLastErrorCode(): number;
  }
  interface Ffi {
    dlopen(path: string, symbols: PeekInit["symbols"]): { symbols: Lib };
    CString: new (ptr: number) => string;
  }
  const scope = globalThis as unknown as {
    onmessage: (e: MessageEvent<PeekInit | PeekRequest>) => void;
    postMessage(reply: PeekReply): void;
  };
  const encoder = new TextEncoder();
  const names = new Map<string, Uint8Array>();
  let ffi: Ffi;
  let lib: Lib;
  scope.onmessage = ({ data }) => {
    if ("soname" in data) {
      // Not import() with a computed name: in the npm build tsc wraps that in
      // a helper function that this function's source text cannot reach.
      ffi = (import.meta as unknown as { require(id: string): Ffi }).require("bun:ffi");
      lib = ffi.dlopen(data.soname, data.symbols).symbols;
      scope.postMessage({ id: 0 });
      return;
    }
    let name = names.get(data.disk);
    if (!name) names.set(data.disk, name = encoder.encode(`${data.disk}\0`));
    if (lib.virDomainBlockPeek(data.dom, name, data.offset, data.size, data.buf, 0) < 0) {
      const msg = lib.virGetLastErrorMessage();
      const message = msg ? new ffi.CString(msg) : "unknown error";
      scope.postMessage({ id: data.id, message, code: lib.virGetLastErrorCode() });
    } else {
      scope.postMessage({ id: data.id });
    }
  };
}
