// UI text in English and Chinese, chosen by the browser's language unless the user picked one.

const STORAGE_KEY = "chat.language";

const MESSAGES = {
  en: {
    "app.title": "Chat",
    "sidebar.label": "Conversations",
    "sidebar.toggle": "Toggle sidebar",
    "sidebar.close": "Close sidebar",
    "sidebar.empty": "No conversations yet.",
    "sidebar.search": "Search chats",
    "sidebar.noMatch": "No chats match.",
    "sidebar.today": "Today",
    "sidebar.yesterday": "Yesterday",
    "sidebar.week": "Previous 7 days",
    "sidebar.older": "Older",
    "chat.new": "New chat",
    "chat.untitled": "New chat",
    "chat.rename": "Rename",
    "chat.delete": "Delete",
    "chat.renameLabel": "Conversation title",
    "chat.loadFailed": "This conversation could not be loaded.",
    "chat.notFound": "This conversation does not exist or was deleted.",
    "welcome.heading": "What can I help with?",
    "welcome.demoHint": "Try one of these:",
    "welcome.suggestion1": "Show me a table and some code",
    "welcome.suggestion2": "Explain long-polling in simple words",
    "welcome.suggestion3": "Write a haiku about autumn",
    "welcome.suggestion4": "/image a lighthouse at dusk",
    "composer.label": "Message",
    "composer.placeholder": "Message",
    "composer.placeholderImage": "Describe an image",
    "composer.send": "Send",
    "composer.stop": "Stop",
    "composer.imageMode": "Image mode",
    "composer.hint": "Enter to send, Shift+Enter for a new line. Start with /image or 画 to draw.",
    "message.you": "You",
    "message.assistant": "Assistant",
    "message.copy": "Copy",
    "message.copyMessage": "Copy message",
    "message.copied": "Copied",
    "message.copyFailed": "Copy failed",
    "message.regenerate": "Regenerate",
    "message.retry": "Retry",
    "message.stopped": "Stopped",
    "message.thinking": "Thinking",
    "message.imageWorking": "Creating image…",
    "message.imageAlt": "Generated image: {prompt}",
    "message.openImage": "Open image full size",
    "message.openInTab": "Open in new tab",
    "message.download": "Download",
    "message.failedPrefix": "Reply failed:",
    "message.emptyReply": "(empty reply)",
    "message.code": "code",
    "error.upstream_auth": "The AI service rejected the server's credentials (API key).",
    "error.upstream_rate_limited": "The AI service is busy right now (rate limited). Try again in a moment.",
    "error.upstream_timeout": "The AI service stopped responding.",
    "error.upstream_error": "The AI service returned an error or the connection to it broke.",
    "error.worker_lost": "The server restarted while writing this reply.",
    "error.unknown": "Something went wrong.",
    "error.network": "Cannot reach the server. Check your connection.",
    "error.reply_running": "A reply is still being written. Stop it or wait until it finishes.",
    "error.rate_limited": "Too many requests. Wait a moment and try again.",
    "error.too_large": "The message is too long.",
    "error.not_found": "It no longer exists.",
    "error.not_last_reply": "Only the last reply can be regenerated.",
    "error.not_ready": "The server is not ready. Try again shortly.",
    "status.reconnecting": "Reconnecting…",
    "banner.demo": "Demo mode: replies come from the built-in simulator, not a real AI model. Set OPENAI_API_KEY on the server to chat with OpenAI.",
    "banner.dismiss": "Dismiss",
    "settings.open": "Settings",
    "settings.title": "Conversation settings",
    "settings.model": "Model",
    "settings.systemPrompt": "System prompt",
    "settings.systemPromptHint": "Instructions the assistant follows in this conversation.",
    "settings.save": "Save",
    "settings.cancel": "Cancel",
    "settings.language": "Language",
    "confirm.deleteTitle": "Delete conversation?",
    "confirm.deleteBody": "“{title}” and all its messages will be deleted. This cannot be undone.",
    "confirm.delete": "Delete",
    "confirm.cancel": "Cancel",
    "signin.title": "Sign in",
    "signin.body": "This chat is private. Enter your access token to continue.",
    "signin.token": "Access token",
    "signin.submit": "Sign in",
    "signin.bad": "That token is not valid.",
    "signin.signOut": "Sign out",
    "lightbox.close": "Close",
    "scroll.bottom": "Scroll to the latest message",
  },
  zh: {
    "app.title": "聊天",
    "sidebar.label": "对话",
    "sidebar.toggle": "显示或隐藏侧栏",
    "sidebar.close": "关闭侧栏",
    "sidebar.empty": "还没有对话。",
    "sidebar.search": "搜索对话",
    "sidebar.noMatch": "没有匹配的对话。",
    "sidebar.today": "今天",
    "sidebar.yesterday": "昨天",
    "sidebar.week": "过去 7 天",
    "sidebar.older": "更早",
    "chat.new": "新对话",
    "chat.untitled": "新对话",
    "chat.rename": "重命名",
    "chat.delete": "删除",
    "chat.renameLabel": "对话标题",
    "chat.loadFailed": "无法加载这个对话。",
    "chat.notFound": "这个对话不存在或已被删除。",
    "welcome.heading": "有什么可以帮你的？",
    "welcome.demoHint": "试试这些：",
    "welcome.suggestion1": "给我看一个表格和一些代码",
    "welcome.suggestion2": "用简单的话解释长轮询",
    "welcome.suggestion3": "写一首关于秋天的俳句",
    "welcome.suggestion4": "画一座黄昏时的灯塔",
    "composer.label": "消息",
    "composer.placeholder": "输入消息",
    "composer.placeholderImage": "描述一张图片",
    "composer.send": "发送",
    "composer.stop": "停止",
    "composer.imageMode": "图片模式",
    "composer.hint": "按 Enter 发送，Shift+Enter 换行。以 /image 或“画”开头即可画图。",
    "message.you": "你",
    "message.assistant": "助手",
    "message.copy": "复制",
    "message.copyMessage": "复制消息",
    "message.copied": "已复制",
    "message.copyFailed": "复制失败",
    "message.regenerate": "重新生成",
    "message.retry": "重试",
    "message.stopped": "已停止",
    "message.thinking": "思考中",
    "message.imageWorking": "正在生成图片…",
    "message.imageAlt": "生成的图片：{prompt}",
    "message.openImage": "查看原图",
    "message.openInTab": "在新标签页打开",
    "message.download": "下载",
    "message.failedPrefix": "回复失败：",
    "message.emptyReply": "（空回复）",
    "message.code": "代码",
    "error.upstream_auth": "AI 服务拒绝了服务器的凭据（API 密钥）。",
    "error.upstream_rate_limited": "AI 服务当前繁忙（请求过多），请稍后再试。",
    "error.upstream_timeout": "AI 服务没有响应。",
    "error.upstream_error": "AI 服务返回了错误，或与它的连接中断了。",
    "error.worker_lost": "服务器在生成这条回复时重启了。",
    "error.unknown": "出了点问题。",
    "error.network": "无法连接服务器，请检查网络。",
    "error.reply_running": "回复仍在生成中。请先停止或等待完成。",
    "error.rate_limited": "请求过于频繁，请稍候再试。",
    "error.too_large": "消息太长了。",
    "error.not_found": "它已不存在。",
    "error.not_last_reply": "只能重新生成最后一条回复。",
    "error.not_ready": "服务器尚未就绪，请稍后再试。",
    "status.reconnecting": "正在重新连接…",
    "banner.demo": "演示模式：回复来自内置模拟器，而不是真正的 AI 模型。在服务器上设置 OPENAI_API_KEY 即可与 OpenAI 对话。",
    "banner.dismiss": "关闭提示",
    "settings.open": "设置",
    "settings.title": "对话设置",
    "settings.model": "模型",
    "settings.systemPrompt": "系统提示词",
    "settings.systemPromptHint": "助手在这个对话中遵循的指示。",
    "settings.save": "保存",
    "settings.cancel": "取消",
    "settings.language": "语言",
    "confirm.deleteTitle": "删除对话？",
    "confirm.deleteBody": "“{title}”及其所有消息将被删除，且无法恢复。",
    "confirm.delete": "删除",
    "confirm.cancel": "取消",
    "signin.title": "登录",
    "signin.body": "这是一个私有聊天。请输入访问令牌以继续。",
    "signin.token": "访问令牌",
    "signin.submit": "登录",
    "signin.bad": "令牌无效。",
    "signin.signOut": "退出登录",
    "lightbox.close": "关闭",
    "scroll.bottom": "滚动到最新消息",
  },
};

export const LANGUAGES = [
  { code: "en", label: "English" },
  { code: "zh", label: "中文" },
];

let current = detectLanguage();

function storedLanguage() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null;
  }
}

/** Returns the language to use: the user's choice, else the browser's. */
export function detectLanguage() {
  const stored = storedLanguage();
  if (stored && MESSAGES[stored]) return stored;
  const preferred = navigator.languages && navigator.languages.length ? navigator.languages : [navigator.language || "en"];
  for (const tag of preferred) {
    const base = String(tag).toLowerCase().split("-")[0];
    if (MESSAGES[base]) return base;
  }
  return "en";
}

/** Returns the current language code. */
export function language() {
  return current;
}

/** Sets and remembers the language chosen by the user. */
export function setLanguage(code) {
  if (!MESSAGES[code]) return;
  current = code;
  try {
    localStorage.setItem(STORAGE_KEY, code);
  } catch {
    // Private windows may refuse storage; the choice then lasts for this page only.
  }
  applyTranslations(document);
}

/** Returns the text for a key in the current language, with {name} placeholders filled. */
export function t(key, vars = {}) {
  const text = MESSAGES[current][key] ?? MESSAGES.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (match, name) => (name in vars ? String(vars[name]) : match));
}

/** Fills every element marked with data-i18n* attributes under root. */
export function applyTranslations(root) {
  document.documentElement.lang = current === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-aria]")) el.setAttribute("aria-label", t(el.dataset.i18nAria));
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
}
