/**
 * Example plugin: a read-only disk backed by an object on a web server,
 * read with `fetch` and HTTP Range requests.
 *
 * ```sh
 * nbdkit-ts -U - ./plugins/examples/http.ts url=https://example.com/disk.img \
 *   --run 'qemu-img convert -f raw "$uri" -O qcow2 disk.qcow2'
 * ```
 *
 * Parameters: `url=URL` (required). The web server must answer
 * `Range: bytes=A-B` with `206 Partial Content`; one that does not is
 * refused when a client connects, with a message saying so.
 *
 * Each connection asks for the object's size when it opens (a changed object
 * shows at the next connection); each NBD read is one Range request, and
 * reads of several clients or of one client's queue overlap.
 *
 * @module
 */
import { definePlugin, NbdError } from "../../mod.ts";

let url = "";

/** GET a byte range; network errors become EIO with the URL in the message. */
async function get(range: string): Promise<Response> {
  try {
    return await fetch(url, { headers: { range: `bytes=${range}` } });
  } catch (err) {
    throw new NbdError("EIO", `${url}: ${(err as Error).message}`, { cause: err });
  }
}

/** The http plugin, as `nbdkit-ts ./plugins/examples/http.ts url=…` loads it. */
export default definePlugin({
  name: "http",
  longname: "nbdkit-ts example: a web object read with Range requests",
  configHelp: "url=<URL>  (required) The object to serve (its server must honour Range).",
  magicConfigKey: "url",

  config(key, value) {
    if (key !== "url") throw new Error(`unknown parameter '${key}'`);
    if (!/^https?:\/\//.test(value)) throw new Error(`url=${value} is not an http(s) URL`);
    url = value;
  },

  configComplete() {
    if (!url) throw new Error("you must specify url=<URL> on the command line");
  },

  // The first byte's Content-Range tells the size, and that Range works.
  async open() {
    const res = await get("0-0");
    await res.body?.cancel();
    const total = /\/(\d+)$/.exec(res.headers.get("content-range") ?? "")?.[1];
    // 416 is the answer for an empty object: "bytes */0".
    if ((res.status !== 206 && res.status !== 416) || total === undefined) {
      throw new NbdError("EIO", `${url}: the server does not honour Range (HTTP ${res.status})`);
    }
    return { size: Number(total) };
  },
  getSize: (h) => h.size,
  canMultiConn: () => true,

  async pread(_h, buf, offset) {
    const res = await get(`${offset}-${offset + buf.length - 1}`);
    if (res.status !== 206) {
      await res.body?.cancel();
      throw new NbdError("EIO", `${url}: HTTP ${res.status} for ${buf.length} bytes at ${offset}`);
    }
    const data = new Uint8Array(await res.arrayBuffer());
    if (data.length !== buf.length) {
      throw new NbdError("EIO", `${url}: ${data.length} bytes for ${buf.length} at ${offset}`);
    }
    buf.set(data);
  },
});
