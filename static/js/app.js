// The chat page: sidebar, routing, messages, composer, settings and sign-in.

import { api, ApiError, onUnauthorized } from "./api.js";
import { copyText } from "./clipboard.js";
import { applyTranslations, language, LANGUAGES, setLanguage, t } from "./i18n.js";
import { ReplyPoller } from "./poller.js";
import { codeTextOf, MarkdownView } from "./render.js";

const RUNNING = new Set(["pending", "streaming"]);
const FINAL = new Set(["done", "stopped", "failed"]);
const PHONE_WIDTH = 768;
const STICK_DISTANCE_PX = 80;

const ICONS = {
  copy: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V6a2 2 0 0 1 2-2h8"/></svg>',
  check: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="m5 12 5 5 9-10"/></svg>',
  regenerate: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M20 11a8 8 0 1 0-2.3 5.7"/><path d="M20 5v6h-6"/></svg>',
  rename: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M12 20h9"/><path d="M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4Z"/></svg>',
  trash: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h16"/><path d="M10 11v6"/><path d="M14 11v6"/><path d="M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12"/><path d="M9 7V4h6v3"/></svg>',
  alert: '<svg viewBox="0 0 24 24" aria-hidden="true"><circle cx="12" cy="12" r="9"/><path d="M12 7v6"/><path d="M12 16.5v.5"/></svg>',
  stopped: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="7" y="7" width="10" height="10" rx="1.5"/></svg>',
  image: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="3" y="4" width="18" height="16" rx="2"/><circle cx="9" cy="10" r="2"/><path d="m21 16-5-5-9 9"/></svg>',
};

const $ = (selector) => document.querySelector(selector);

const els = {
  app: $("#app"),
  sidebar: $("#sidebar"),
  backdrop: $("#backdrop"),
  sidebarToggle: $("#sidebar-toggle"),
  sidebarClose: $("#sidebar-close"),
  newChat: $("#new-chat"),
  conversationList: $("#conversation-list"),
  conversationEmpty: $("#conversation-empty"),
  search: $("#conversation-search"),
  languageSelect: $("#language-select"),
  signOut: $("#sign-out"),
  modelSelect: $("#model-select"),
  title: $("#conversation-title"),
  settingsButton: $("#settings-button"),
  demoBanner: $("#demo-banner"),
  demoBannerClose: $("#demo-banner-close"),
  conversation: $("#conversation"),
  welcome: $("#welcome"),
  suggestions: $("#suggestions"),
  notice: $("#conversation-notice"),
  messages: $("#messages"),
  scrollBottom: $("#scroll-bottom"),
  reconnecting: $("#reconnecting"),
  composer: $("#composer"),
  input: $("#message-input"),
  imageMode: $("#image-mode"),
  send: $("#send-button"),
  stop: $("#stop-button"),
  toast: $("#toast"),
  signin: $("#signin"),
  signinForm: $("#signin-form"),
  signinToken: $("#signin-token"),
  signinError: $("#signin-error"),
  settingsDialog: $("#settings-dialog"),
  settingsForm: $("#settings-form"),
  settingsModel: $("#settings-model"),
  settingsSystemPrompt: $("#settings-system-prompt"),
  confirmDialog: $("#confirm-dialog"),
  confirmBody: $("#confirm-body"),
  lightbox: $("#lightbox"),
  lightboxImage: $("#lightbox-image"),
  lightboxLink: $("#lightbox-link"),
  lightboxDownload: $("#lightbox-download"),
};

const state = {
  started: false,
  config: null,
  authRequired: false,
  conversations: [],
  currentId: null,
  conversation: null,
  messages: [],
  views: new Map(),
  draft: { model: null, system_prompt: "" },
  imageMode: false,
  sending: false,
  loadToken: 0,
  stickToBottom: true,
  offline: new Set(),
  renamingId: null,
  toastTimer: null,
};

// ---------------------------------------------------------------- helpers

function isPhone() {
  return window.matchMedia(`(max-width: ${PHONE_WIDTH}px)`).matches;
}

function iconButton(className, labelKey, icon) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `icon-button ${className}`;
  button.setAttribute("aria-label", t(labelKey));
  button.title = t(labelKey);
  button.innerHTML = icon;
  return button;
}

function errorText(error) {
  if (error instanceof ApiError) {
    const key = `error.${error.code}`;
    const known = t(key);
    if (known !== key) return known;
    return error.message || t("error.unknown");
  }
  return t("error.unknown");
}

function replyErrorText(error) {
  const code = error && error.code;
  const key = `error.${code}`;
  const known = code ? t(key) : key;
  return known !== key ? known : (error && error.message) || t("error.unknown");
}

function showToast(text) {
  els.toast.textContent = text;
  els.toast.hidden = false;
  clearTimeout(state.toastTimer);
  state.toastTimer = setTimeout(() => {
    els.toast.hidden = true;
  }, 6000);
}

function safeImageUrl(url) {
  if (typeof url !== "string" || !url) return null;
  try {
    const parsed = new URL(url, location.href);
    return parsed.origin === location.origin ? parsed.href : null;
  } catch {
    return null;
  }
}

function conversationTitle(conversation) {
  return (conversation && conversation.title && conversation.title.trim()) || t("chat.untitled");
}

function currentModel() {
  if (state.conversation) return state.conversation.model;
  return state.draft.model || (state.config && state.config.default_model) || "";
}

function runningReply() {
  return state.messages.find((message) => message.role === "assistant" && RUNNING.has(message.status)) || null;
}

function lastReply() {
  for (let index = state.messages.length - 1; index >= 0; index -= 1) {
    if (state.messages[index].role === "assistant") return state.messages[index];
  }
  return null;
}

function promptBefore(message) {
  const index = state.messages.indexOf(message);
  for (let i = index - 1; i >= 0; i -= 1) {
    if (state.messages[i].role === "user") return state.messages[i].content;
  }
  return "";
}

function sessionFlag(name) {
  try {
    return sessionStorage.getItem(`chat.${name}`) === "1";
  } catch {
    return false;
  }
}

function setSessionFlag(name) {
  try {
    sessionStorage.setItem(`chat.${name}`, "1");
  } catch {
    // Without storage the flag lasts until the next page load.
  }
}

// ---------------------------------------------------------------- layout

function setSidebarOpen(open) {
  els.app.dataset.sidebar = open ? "open" : "closed";
  els.sidebarToggle.setAttribute("aria-expanded", String(open));
  els.backdrop.hidden = !(open && isPhone());
}

function scrollToBottom() {
  els.conversation.scrollTop = els.conversation.scrollHeight;
  state.stickToBottom = true;
  els.scrollBottom.hidden = true;
}

function keepScrolled() {
  if (state.stickToBottom) els.conversation.scrollTop = els.conversation.scrollHeight;
}

function onConversationScroll() {
  const { scrollTop, scrollHeight, clientHeight } = els.conversation;
  state.stickToBottom = scrollHeight - scrollTop - clientHeight < STICK_DISTANCE_PX;
  els.scrollBottom.hidden = state.stickToBottom;
}

function autosizeInput() {
  els.input.style.height = "auto";
  els.input.style.height = `${Math.min(els.input.scrollHeight, 240)}px`;
}

function setReconnecting(messageId, offline) {
  if (offline) state.offline.add(messageId);
  else state.offline.delete(messageId);
  els.reconnecting.hidden = state.offline.size === 0;
}

// ---------------------------------------------------------------- sidebar

function dayGroup(iso) {
  const then = new Date(iso);
  const now = new Date();
  const startOfToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const day = 24 * 3600 * 1000;
  if (then.getTime() >= startOfToday) return "sidebar.today";
  if (then.getTime() >= startOfToday - day) return "sidebar.yesterday";
  if (then.getTime() >= startOfToday - 7 * day) return "sidebar.week";
  return "sidebar.older";
}

function renderConversationList() {
  const list = els.conversationList;
  list.replaceChildren();
  const query = els.search.value.trim().toLocaleLowerCase();
  const shown = query
    ? state.conversations.filter((c) => conversationTitle(c).toLocaleLowerCase().includes(query))
    : state.conversations;
  els.conversationEmpty.textContent = t(state.conversations.length ? "sidebar.noMatch" : "sidebar.empty");
  els.conversationEmpty.hidden = shown.length > 0;
  let group = null;
  let ul = null;
  for (const conversation of shown) {
    const key = dayGroup(conversation.updated_at || conversation.created_at);
    if (key !== group) {
      group = key;
      const heading = document.createElement("h2");
      heading.className = "conversation-group";
      heading.textContent = t(key);
      ul = document.createElement("ul");
      list.append(heading, ul);
    }
    ul.append(conversationItem(conversation));
  }
}

function conversationItem(conversation) {
  const li = document.createElement("li");
  li.className = "conversation-item";
  li.dataset.conversationId = conversation.id;
  const active = conversation.id === state.currentId;
  if (active) li.classList.add("active");

  if (state.renamingId === conversation.id) {
    const input = document.createElement("input");
    input.type = "text";
    input.className = "rename-input";
    input.value = conversation.title || "";
    input.maxLength = 200;
    input.setAttribute("aria-label", t("chat.renameLabel"));
    let finished = false;
    const finish = (save) => {
      if (finished) return;
      finished = true;
      state.renamingId = null;
      if (save && input.value.trim() && input.value.trim() !== conversation.title) {
        renameConversation(conversation.id, input.value.trim());
      } else {
        renderConversationList();
      }
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        event.preventDefault();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    li.append(input);
    queueMicrotask(() => {
      input.focus();
      input.select();
    });
    return li;
  }

  const link = document.createElement("a");
  link.className = "conversation-link";
  link.href = `/c/${encodeURIComponent(conversation.id)}`;
  link.textContent = conversationTitle(conversation);
  link.title = conversationTitle(conversation);
  if (active) link.setAttribute("aria-current", "page");
  link.addEventListener("click", (event) => {
    if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    event.preventDefault();
    navigate(conversation.id);
  });

  const actions = document.createElement("div");
  actions.className = "conversation-actions";
  const rename = iconButton("small", "chat.rename", ICONS.rename);
  rename.addEventListener("click", () => {
    state.renamingId = conversation.id;
    renderConversationList();
  });
  const remove = iconButton("small danger", "chat.delete", ICONS.trash);
  remove.addEventListener("click", () => confirmDelete(conversation));
  actions.append(rename, remove);
  li.append(link, actions);
  return li;
}

async function refreshConversations() {
  try {
    const data = await api.listConversations();
    state.conversations = data.conversations || [];
    const fresh = state.conversation && state.conversations.find((c) => c.id === state.conversation.id);
    if (fresh) {
      state.conversation = fresh;
      renderHeader();
    }
    if (state.renamingId === null) renderConversationList();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showToast(errorText(error));
  }
}

async function renameConversation(id, title) {
  try {
    const updated = await api.updateConversation(id, { title });
    replaceConversation(updated);
  } catch (error) {
    showToast(errorText(error));
  }
  renderConversationList();
}

function replaceConversation(updated) {
  state.conversations = state.conversations.map((c) => (c.id === updated.id ? updated : c));
  if (state.conversation && state.conversation.id === updated.id) {
    state.conversation = updated;
    renderHeader();
  }
}

function confirmDelete(conversation) {
  els.confirmBody.textContent = t("confirm.deleteBody", { title: conversationTitle(conversation) });
  els.confirmDialog.returnValue = "";
  els.confirmDialog.showModal();
  els.confirmDialog.addEventListener(
    "close",
    async () => {
      if (els.confirmDialog.returnValue !== "confirm") return;
      try {
        await api.deleteConversation(conversation.id);
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 404)) {
          showToast(errorText(error));
          return;
        }
      }
      state.conversations = state.conversations.filter((c) => c.id !== conversation.id);
      if (state.currentId === conversation.id) navigate(null);
      else renderConversationList();
    },
    { once: true },
  );
}

// ---------------------------------------------------------------- routing

function idFromPath() {
  const match = /^\/c\/([^/]+)\/?$/.exec(location.pathname);
  return match ? decodeURIComponent(match[1]) : null;
}

function navigate(id, { replace = false } = {}) {
  const path = id ? `/c/${encodeURIComponent(id)}` : "/";
  if (location.pathname !== path) {
    if (replace) history.replaceState({}, "", path);
    else history.pushState({}, "", path);
  }
  if (isPhone()) setSidebarOpen(false);
  return route();
}

function route() {
  const id = idFromPath();
  if (id) return openConversation(id);
  showDraft();
  return Promise.resolve();
}

function leaveConversation() {
  for (const view of state.views.values()) {
    if (view.poller) view.poller.stop();
    if (view.markdown) view.markdown.dispose();
  }
  state.views.clear();
  state.offline.clear();
  els.reconnecting.hidden = true;
  state.messages = [];
  state.conversation = null;
  els.messages.replaceChildren();
  els.notice.hidden = true;
}

function showDraft() {
  state.loadToken += 1;
  leaveConversation();
  state.currentId = null;
  state.draft = { model: state.config ? state.config.default_model : null, system_prompt: "" };
  renderHeader();
  renderConversationList();
  updateWelcome();
  updateComposer();
  if (!isPhone()) els.input.focus();
}

async function openConversation(id) {
  const token = ++state.loadToken;
  leaveConversation();
  state.currentId = id;
  renderConversationList();
  renderHeader();
  els.welcome.hidden = true;
  updateComposer();
  let data;
  try {
    data = await api.getConversation(id);
  } catch (error) {
    if (token !== state.loadToken) return;
    if (error instanceof ApiError && error.status === 401) return;
    els.notice.textContent = error instanceof ApiError && error.status === 404 ? t("chat.notFound") : t("chat.loadFailed");
    els.notice.hidden = false;
    return;
  }
  if (token !== state.loadToken) return;
  state.conversation = data.conversation;
  state.messages = data.messages || [];
  renderHeader();
  for (const message of state.messages) {
    els.messages.append(createMessageView(message).element);
    if (message.role === "assistant" && RUNNING.has(message.status)) follow(message);
  }
  refreshAllChrome();
  updateWelcome();
  updateComposer();
  scrollToBottom();
  if (!isPhone()) els.input.focus();
}

function renderHeader() {
  const title = state.currentId ? conversationTitle(state.conversation) : t("chat.new");
  els.title.textContent = state.currentId && !state.conversation ? "" : title;
  document.title = state.currentId && state.conversation ? `${title} · ${t("app.title")}` : t("app.title");
  fillModelSelect(els.modelSelect, currentModel());
}

function fillModelSelect(select, selected) {
  const models = (state.config && state.config.models) || [];
  const names = models.includes(selected) || !selected ? models : [selected, ...models];
  select.replaceChildren(
    ...names.map((name) => {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      return option;
    }),
  );
  if (selected) select.value = selected;
}

function updateWelcome() {
  els.welcome.hidden = state.messages.length > 0 || (state.currentId !== null && !state.conversation);
}

// ---------------------------------------------------------------- messages

function createMessageView(message) {
  const element = document.createElement("article");
  element.className = "message";
  element.dataset.messageId = message.id;
  element.dataset.role = message.role;
  element.dataset.status = message.status;
  element.dataset.mode = message.mode || "chat";
  const view = { message, element, markdown: null, poller: null, imageKey: null };

  if (message.role === "user") {
    const bubble = document.createElement("div");
    bubble.className = "bubble";
    if (message.mode === "image") {
      const tag = document.createElement("span");
      tag.className = "mode-tag";
      tag.innerHTML = ICONS.image;
      const label = document.createElement("span");
      label.dataset.i18n = "composer.imageMode";
      label.textContent = t("composer.imageMode");
      tag.append(label);
      bubble.append(tag);
    }
    const text = document.createElement("div");
    text.className = "user-text";
    text.textContent = message.content;
    bubble.append(text);
    element.append(bubble);
  } else {
    const body = document.createElement("div");
    body.className = "message-body";
    if (message.mode === "image") {
      view.imageSlot = document.createElement("div");
      view.imageSlot.className = "image-slot";
      body.append(view.imageSlot);
    }
    const markdown = document.createElement("div");
    markdown.className = "markdown";
    body.append(markdown);
    const typing = document.createElement("div");
    typing.className = "typing";
    typing.setAttribute("aria-label", t("message.thinking"));
    typing.setAttribute("role", "img");
    typing.append(document.createElement("span"), document.createElement("span"), document.createElement("span"));
    body.append(typing);
    view.note = document.createElement("div");
    view.note.className = "message-note";
    view.actions = document.createElement("div");
    view.actions.className = "message-actions";
    element.append(body, view.note, view.actions);
    view.markdown = new MarkdownView(markdown, { onRender: keepScrolled });
    if (message.content && !RUNNING.has(message.status)) {
      view.markdown.setText(message.content);
      view.markdown.flush();
    }
  }
  state.views.set(message.id, view);
  return view;
}

function setStatus(view, status) {
  view.message.status = status;
  view.element.dataset.status = status;
}

function follow(message) {
  const view = state.views.get(message.id);
  if (!view) return;
  if (view.poller) view.poller.stop();
  // A running reply is always read from the start, so a reload or second tab shows all of it.
  message.content = "";
  view.markdown.setText("");
  view.markdown.flush();
  view.poller = new ReplyPoller(
    message.id,
    {
      onText(text) {
        message.content += text;
        view.markdown.append(text);
        if (message.status === "pending") setStatus(view, "streaming");
      },
      onAnswer(answer) {
        const status = FINAL.has(answer.status) && !answer.done ? "streaming" : answer.status;
        if (status !== message.status) setStatus(view, status);
        message.error = answer.error || null;
        if (answer.image_url) message.image_url = answer.image_url;
        renderImage(view);
      },
      onFinal(answer) {
        view.markdown.flush();
        setStatus(view, answer.status);
        message.error = answer.error || null;
        message.image_url = answer.image_url || message.image_url || null;
        setReconnecting(message.id, false);
        refreshAllChrome();
        updateComposer();
        keepScrolled();
        refreshConversations();
      },
      onConnection(ok) {
        setReconnecting(message.id, !ok);
      },
      onGone() {
        setReconnecting(message.id, false);
        if (state.currentId) openConversation(state.currentId);
      },
      onReset() {
        message.content = "";
        view.markdown.setText("");
      },
    },
    { timeout: state.config ? state.config.poll_timeout : null },
  );
  view.poller.start("0");
  refreshAllChrome();
}

function renderImage(view) {
  const message = view.message;
  if (!view.imageSlot) return;
  const url = safeImageUrl(message.image_url);
  const key = RUNNING.has(message.status) ? "working" : url ? `image:${url}` : "none";
  if (key === view.imageKey) return;
  view.imageKey = key;
  view.imageSlot.replaceChildren();
  if (key === "working") {
    const placeholder = document.createElement("div");
    placeholder.className = "image-placeholder";
    placeholder.setAttribute("role", "img");
    placeholder.setAttribute("aria-label", t("message.imageWorking"));
    const label = document.createElement("span");
    label.textContent = t("message.imageWorking");
    placeholder.append(label);
    view.imageSlot.append(placeholder);
  } else if (url) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "image-button";
    button.setAttribute("aria-label", t("message.openImage"));
    button.title = t("message.openImage");
    const img = document.createElement("img");
    img.className = "generated-image";
    img.src = url;
    img.alt = t("message.imageAlt", { prompt: promptBefore(message) });
    img.addEventListener("load", keepScrolled);
    button.append(img);
    button.addEventListener("click", () => openLightbox(url, img.alt));
    view.imageSlot.append(button);
  }
  keepScrolled();
}

function openLightbox(url, alt) {
  els.lightboxImage.src = url;
  els.lightboxImage.alt = alt;
  els.lightboxLink.href = url;
  els.lightboxDownload.href = url;
  els.lightboxDownload.download = `image-${url.split("/").slice(-2, -1)[0] || "generated"}.png`;
  els.lightbox.showModal();
}

function refreshChrome(view) {
  const message = view.message;
  if (message.role !== "assistant") return;
  renderImage(view);
  const running = RUNNING.has(message.status);
  const isLast = lastReply() === message;
  const conversationBusy = Boolean(runningReply()) || state.sending;
  // Rebuilding buttons that did not change would drop the keyboard focus on them.
  const key = [message.status, isLast, conversationBusy, Boolean(message.content), message.error && message.error.code, language()].join("|");
  if (view.chromeKey === key) return;
  view.chromeKey = key;

  view.note.replaceChildren();
  view.note.className = "message-note";
  if (message.status === "stopped") {
    view.note.classList.add("stopped");
    const icon = document.createElement("span");
    icon.innerHTML = ICONS.stopped;
    const label = document.createElement("span");
    label.textContent = t("message.stopped");
    view.note.append(icon.firstChild, label);
  } else if (message.status === "failed") {
    view.note.classList.add("failed");
    const icon = document.createElement("span");
    icon.innerHTML = ICONS.alert;
    const label = document.createElement("span");
    label.className = "failed-reason";
    label.textContent = `${t("message.failedPrefix")} ${replyErrorText(message.error)}`;
    view.note.append(icon.firstChild, label);
    if (isLast) {
      const retry = document.createElement("button");
      retry.type = "button";
      retry.className = "retry-button";
      retry.textContent = t("message.retry");
      retry.disabled = conversationBusy;
      retry.addEventListener("click", () => regenerate(message.id));
      view.note.append(retry);
    }
  } else if (message.status === "done" && !message.content && message.mode !== "image") {
    view.note.textContent = t("message.emptyReply");
  }

  view.actions.replaceChildren();
  if (running) return;
  if (message.content) {
    const copy = iconButton("copy-message", "message.copyMessage", ICONS.copy);
    copy.addEventListener("click", () => copyWithFeedback(copy, message.content, true));
    view.actions.append(copy);
  }
  if (isLast && message.status !== "failed") {
    const again = iconButton("regenerate", "message.regenerate", ICONS.regenerate);
    again.disabled = conversationBusy;
    again.addEventListener("click", () => regenerate(message.id));
    view.actions.append(again);
  }
}

function refreshAllChrome() {
  for (const view of state.views.values()) refreshChrome(view);
  keepScrolled();
}

async function copyWithFeedback(button, text, iconOnly) {
  const ok = await copyText(text);
  if (iconOnly) {
    button.innerHTML = ok ? ICONS.check : ICONS.alert;
    button.title = ok ? t("message.copied") : t("message.copyFailed");
    setTimeout(() => {
      button.innerHTML = ICONS.copy;
      button.title = t("message.copyMessage");
    }, 1500);
  } else {
    button.textContent = ok ? t("message.copied") : t("message.copyFailed");
    button.classList.toggle("done", ok);
    setTimeout(() => {
      button.textContent = t("message.copy");
      button.classList.remove("done");
    }, 1500);
  }
}

function onMessagesClick(event) {
  const button = event.target.closest(".copy-code");
  if (!button) return;
  const block = button.closest(".code-block");
  if (block) copyWithFeedback(button, codeTextOf(block), false);
}

// ---------------------------------------------------------------- actions

function parsePrompt(raw) {
  const text = raw.replace(/\s+$/, "");
  const start = text.trimStart();
  const command = /^\/image(?:\s+|$)/i.exec(start);
  if (command) return { content: start.slice(command[0].length), mode: "image" };
  if (start.startsWith("画")) return { content: text, mode: "image" };
  return { content: text, mode: state.imageMode ? "image" : "chat" };
}

async function send() {
  const raw = els.input.value;
  const { content, mode } = parsePrompt(raw);
  if (!content.trim() || state.sending || runningReply()) return;
  // The open conversation is still loading; sending now would show the new messages twice.
  if (state.currentId && !state.conversation) return;
  state.sending = true;
  els.input.value = "";
  autosizeInput();
  updateComposer();
  let conversationId = state.currentId;
  try {
    if (!conversationId) {
      const created = await api.createConversation({
        model: state.draft.model || undefined,
        system_prompt: state.draft.system_prompt || undefined,
      });
      conversationId = created.id;
      state.loadToken += 1;
      state.currentId = created.id;
      state.conversation = created;
      state.conversations = [created, ...state.conversations];
      history.pushState({}, "", `/c/${encodeURIComponent(created.id)}`);
      renderHeader();
      renderConversationList();
    }
    const result = await api.sendMessage(conversationId, content, mode);
    if (state.currentId !== conversationId) return;
    for (const message of [result.message, result.reply]) {
      state.messages.push(message);
      els.messages.append(createMessageView(message).element);
    }
    state.sending = false;
    updateWelcome();
    follow(result.reply);
    scrollToBottom();
    refreshConversations();
  } catch (error) {
    if (!els.input.value) {
      els.input.value = raw;
      autosizeInput();
    }
    if (!(error instanceof ApiError && error.status === 401)) showToast(errorText(error));
    // Another tab may have started a reply here: show it.
    if (error instanceof ApiError && error.code === "reply_running" && state.currentId === conversationId) {
      openConversation(conversationId);
    }
  } finally {
    state.sending = false;
    refreshAllChrome();
    updateComposer();
  }
}

async function stopReply() {
  const reply = runningReply();
  if (!reply) return;
  const view = state.views.get(reply.id);
  try {
    const data = await api.stop(reply.id);
    const stopped = data && data.message && data.message.id ? data.message : data;
    if (!view || !stopped || !FINAL.has(stopped.status)) return;
    // The stop answer carries the frozen text; it replaces what the polls brought so far.
    if (view.poller) view.poller.stop();
    reply.content = stopped.content || "";
    reply.error = stopped.error || null;
    reply.image_url = stopped.image_url || null;
    view.markdown.setText(reply.content);
    view.markdown.flush();
    setStatus(view, stopped.status);
    setReconnecting(reply.id, false);
    refreshAllChrome();
    updateComposer();
    refreshConversations();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showToast(errorText(error));
  }
  els.input.focus();
}

async function regenerate(messageId) {
  const index = state.messages.findIndex((message) => message.id === messageId);
  if (index < 0 || state.sending || runningReply()) return;
  const conversationId = state.currentId;
  state.sending = true;
  refreshAllChrome();
  updateComposer();
  try {
    const data = await api.regenerate(messageId);
    if (state.currentId !== conversationId) return;
    const reply = data.reply;
    const old = state.views.get(messageId);
    if (old) {
      if (old.poller) old.poller.stop();
      state.views.delete(messageId);
    }
    state.messages.splice(index, 1, reply);
    const view = createMessageView(reply);
    if (old) old.element.replaceWith(view.element);
    else els.messages.append(view.element);
    state.sending = false;
    follow(reply);
    keepScrolled();
  } catch (error) {
    if (!(error instanceof ApiError && error.status === 401)) showToast(errorText(error));
  } finally {
    state.sending = false;
    refreshAllChrome();
    updateComposer();
  }
}

function updateComposer() {
  const running = Boolean(runningReply());
  const { mode } = parsePrompt(els.input.value);
  els.send.hidden = running;
  els.send.disabled = running || state.sending || !els.input.value.trim();
  els.stop.hidden = !running;
  els.composer.classList.toggle("image", mode === "image");
  els.input.placeholder = t(mode === "image" ? "composer.placeholderImage" : "composer.placeholder");
}

function toggleImageMode(event) {
  state.imageMode = !state.imageMode;
  els.imageMode.setAttribute("aria-pressed", String(state.imageMode));
  updateComposer();
  // A pointer click returns to typing; a keyboard press leaves focus on the toggle.
  if (event && event.detail > 0) els.input.focus();
}

async function changeModel(model) {
  if (!state.currentId || !state.conversation) {
    state.draft.model = model;
    return;
  }
  try {
    replaceConversation(await api.updateConversation(state.currentId, { model }));
  } catch (error) {
    showToast(errorText(error));
    fillModelSelect(els.modelSelect, currentModel());
  }
}

function openSettings() {
  fillModelSelect(els.settingsModel, currentModel());
  els.settingsSystemPrompt.value = state.conversation ? state.conversation.system_prompt || "" : state.draft.system_prompt;
  els.settingsDialog.returnValue = "";
  els.settingsDialog.showModal();
}

async function saveSettings() {
  const fields = { model: els.settingsModel.value, system_prompt: els.settingsSystemPrompt.value };
  if (!state.currentId || !state.conversation) {
    state.draft = { ...state.draft, ...fields };
    renderHeader();
    return;
  }
  try {
    replaceConversation(await api.updateConversation(state.currentId, fields));
  } catch (error) {
    showToast(errorText(error));
  }
}

// ---------------------------------------------------------------- sign-in and start

function showSignIn() {
  leaveConversation();
  els.app.hidden = true;
  els.signin.hidden = false;
  els.signinError.hidden = true;
  els.signinToken.value = "";
  els.signinToken.focus();
}

async function signIn(event) {
  event.preventDefault();
  els.signinError.hidden = true;
  try {
    await api.signIn(els.signinToken.value.trim());
  } catch (error) {
    els.signinError.textContent = error instanceof ApiError && error.code === "bad_token" ? t("signin.bad") : errorText(error);
    els.signinError.hidden = false;
    return;
  }
  els.signin.hidden = true;
  await startApp();
}

async function signOut() {
  try {
    await api.signOut();
  } catch {
    // Signing out of a session that is already gone is fine.
  }
  state.conversations = [];
  showSignIn();
}

async function startApp() {
  els.signin.hidden = true;
  els.app.hidden = false;
  els.signOut.hidden = !state.authRequired;
  try {
    state.config = await api.config();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return;
    showToast(errorText(error));
    state.config = { models: [], default_model: "", poll_timeout: 25, upstream: "" };
  }
  els.demoBanner.hidden = state.config.upstream !== "demo" || sessionFlag("demoBannerDismissed");
  if (state.config.max_content_chars) els.input.maxLength = state.config.max_content_chars;
  state.started = true;
  await refreshConversations();
  await route();
  document.body.dataset.ready = "true";
}

function fillLanguageSelect() {
  els.languageSelect.replaceChildren(
    ...LANGUAGES.map(({ code, label }) => {
      const option = document.createElement("option");
      option.value = code;
      option.textContent = label;
      return option;
    }),
  );
  els.languageSelect.value = language();
}

function onLanguageChange() {
  setLanguage(els.languageSelect.value);
  renderConversationList();
  renderHeader();
  for (const view of state.views.values()) {
    view.imageKey = null;
    view.chromeKey = null;
  }
  refreshAllChrome();
  updateComposer();
}

function onComposerKeydown(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
    event.preventDefault();
    if (!els.send.disabled) send();
  }
}

function onGlobalKeydown(event) {
  const mod = event.ctrlKey || event.metaKey;
  if (mod && event.shiftKey && event.key.toLowerCase() === "o") {
    event.preventDefault();
    navigate(null);
  } else if (event.key === "Escape" && isPhone() && els.app.dataset.sidebar === "open") {
    setSidebarOpen(false);
    els.sidebarToggle.focus();
  }
}

function wire() {
  els.composer.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  els.input.addEventListener("keydown", onComposerKeydown);
  els.input.addEventListener("input", () => {
    autosizeInput();
    updateComposer();
  });
  els.stop.addEventListener("click", stopReply);
  els.imageMode.addEventListener("click", toggleImageMode);
  els.newChat.addEventListener("click", () => navigate(null));
  els.search.addEventListener("input", renderConversationList);
  els.sidebarToggle.addEventListener("click", () => setSidebarOpen(els.app.dataset.sidebar !== "open"));
  els.sidebarClose.addEventListener("click", () => setSidebarOpen(false));
  els.backdrop.addEventListener("click", () => setSidebarOpen(false));
  els.conversation.addEventListener("scroll", onConversationScroll, { passive: true });
  els.scrollBottom.addEventListener("click", scrollToBottom);
  els.messages.addEventListener("click", onMessagesClick);
  els.modelSelect.addEventListener("change", () => changeModel(els.modelSelect.value));
  els.settingsButton.addEventListener("click", openSettings);
  els.settingsDialog.addEventListener("close", () => {
    if (els.settingsDialog.returnValue === "save") saveSettings();
  });
  els.lightbox.addEventListener("click", (event) => {
    if (event.target === els.lightbox) els.lightbox.close();
  });
  els.suggestions.addEventListener("click", (event) => {
    const button = event.target.closest(".suggestion");
    if (!button) return;
    els.input.value = button.textContent;
    autosizeInput();
    updateComposer();
    send();
  });
  els.demoBannerClose.addEventListener("click", () => {
    els.demoBanner.hidden = true;
    setSessionFlag("demoBannerDismissed");
    els.input.focus();
  });
  els.signinForm.addEventListener("submit", signIn);
  els.signOut.addEventListener("click", signOut);
  els.languageSelect.addEventListener("change", onLanguageChange);
  document.addEventListener("keydown", onGlobalKeydown);
  document.addEventListener("visibilitychange", () => {
    if (state.started && !document.hidden && els.signin.hidden) refreshConversations();
  });
  window.addEventListener("popstate", () => {
    if (state.started) route();
  });
  window.matchMedia(`(max-width: ${PHONE_WIDTH}px)`).addEventListener("change", (event) => setSidebarOpen(!event.matches));
  onUnauthorized(() => {
    if (!els.signin.hidden) return;
    state.authRequired = true;
    showSignIn();
  });
}

async function boot() {
  applyTranslations(document);
  fillLanguageSelect();
  setSidebarOpen(!isPhone());
  wire();
  let session = null;
  try {
    session = await api.session();
  } catch {
    session = null;
  }
  state.authRequired = Boolean(session && session.auth_required);
  if (session && session.auth_required && !session.signed_in) {
    els.app.hidden = true;
    showSignIn();
    return;
  }
  await startApp();
}

boot();
