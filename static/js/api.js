// Talks JSON to the server's /api endpoints and turns failures into ApiError.

/** An error answer from the server, or a network failure (status 0, code "network"). */
export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message || code);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

let unauthorizedHandler = null;

/** Registers the function called when the server says we are not signed in. */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

/** Sends one request and returns the parsed JSON body (null for 204). */
export async function request(method, path, body = undefined, { signal } = {}) {
  const init = { method, headers: { Accept: "application/json" }, credentials: "same-origin", signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, "network", String(error.message || error));
  }
  if (response.status === 204) return null;
  let data = null;
  try {
    data = await response.json();
  } catch (error) {
    if (error.name === "AbortError") throw error;
    if (response.ok) throw new ApiError(response.status, "bad_response", "The server sent something that is not JSON.");
  }
  if (!response.ok) {
    const info = (data && data.error) || {};
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    const apiError = new ApiError(response.status, info.code || `http_${response.status}`, info.message, retryAfter);
    if (response.status === 401 && apiError.code !== "bad_token" && unauthorizedHandler) unauthorizedHandler(apiError);
    throw apiError;
  }
  return data;
}

export const api = {
  session: () => request("GET", "/api/session"),
  signIn: (token) => request("POST", "/api/session", { token }),
  signOut: () => request("DELETE", "/api/session"),
  config: () => request("GET", "/api/config"),
  listConversations: () => request("GET", "/api/conversations"),
  createConversation: (fields) => request("POST", "/api/conversations", fields),
  getConversation: (id) => request("GET", `/api/conversations/${encodeURIComponent(id)}`),
  updateConversation: (id, fields) => request("PATCH", `/api/conversations/${encodeURIComponent(id)}`, fields),
  deleteConversation: (id) => request("DELETE", `/api/conversations/${encodeURIComponent(id)}`),
  sendMessage: (id, content, mode) =>
    request("POST", `/api/conversations/${encodeURIComponent(id)}/messages`, { content, mode }),
  getMessage: (id) => request("GET", `/api/messages/${encodeURIComponent(id)}`),
  stop: (id) => request("POST", `/api/messages/${encodeURIComponent(id)}/stop`),
  regenerate: (id) => request("POST", `/api/messages/${encodeURIComponent(id)}/regenerate`),
  poll: (id, cursor, timeout, signal) => {
    const query = new URLSearchParams({ cursor });
    if (timeout != null) query.set("timeout", String(timeout));
    return request("GET", `/api/messages/${encodeURIComponent(id)}/poll?${query}`, undefined, { signal });
  },
};
