//! What warmpool reads from Jenkins, parsed: the batched node list (`computer/api/json` with a
//! `tree`), the queue (`queue/api/json`), the agent secret in a JNLP file, and the label a queue
//! item waits for (Jenkins does not export a queue item's label: it is parsed from the item's
//! `why`, or, when Jenkins names none, read from the task's `labelExpression`).
//!
//! Pure: no I/O. Shapes and their sources are listed in docs/JENKINS.md.

use serde::Deserialize;

/// What could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// A JSON answer of another shape.
    #[error("{what} is not the expected JSON: {source}")]
    Json {
        /// The endpoint (`computer/api/json`, `queue/api/json`).
        what: &'static str,
        /// The parser's complaint.
        source: serde_json::Error,
    },
    /// No `<application-desc>` element.
    #[error("no <application-desc> in the JNLP file")]
    NoApplicationDesc,
    /// An `<argument>` without its end tag.
    #[error("unterminated <argument> in the JNLP file")]
    UnterminatedArgument,
    /// The file is another node's.
    #[error("the JNLP file is for node {found:?}, not {node:?}")]
    OtherNode {
        /// The node asked for.
        node: String,
        /// The node named in the file.
        found: String,
    },
    /// Not the (secret, name) arguments.
    #[error("the JNLP file has fewer than two <argument>s (secret, name)")]
    TooFewArguments,
}

/// The `tree` of the one node poll: every field the connector needs, nothing else.
pub const COMPUTER_TREE: &str = "computer[displayName,description,offline,idle,numExecutors,assignedLabels[name],executors[idle,currentExecutable[url]]]";

/// The `tree` of the check for connected agents between polls.
pub const ONLINE_TREE: &str = "computer[displayName,offline]";

/// Appended to a node's description when warmpool drains it (its last allowed build runs): the
/// drained state, explicit and read back by every poll, also by a restarted instance.
pub const DRAINED_MARKER: &str = "[warmpool: drained, deleted after its build]";

/// A node's description once drained.
pub fn drained_description(description: &str) -> String {
    format!("{description} {DRAINED_MARKER}")
}
/// The `tree` of the queue poll.
pub const QUEUE_TREE: &str = "items[id,buildable,blocked,stuck,why,task[name,labelExpression]]";

/// One Jenkins node as the poll sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeObs {
    /// Node name (`displayName`).
    pub name: String,
    /// No agent connected.
    pub offline: bool,
    /// The build running on it (absolute URL), if any: the lease holder.
    pub build: Option<String>,
    /// Busy without an exported build (an executable the user may not read).
    pub busy: bool,
    /// Labels, including the node's own name.
    pub labels: Vec<String>,
    /// Drained by warmpool: its description carries [`DRAINED_MARKER`]. Also a node with no
    /// label but its own name: what a drain left before the marker existed (a pool's labels
    /// are never empty, so no label change of the pool can look like this).
    pub drained: bool,
    /// The controller's built-in node (`Hudson$MasterComputer`), not an agent node.
    pub built_in: bool,
}

/// `_class` of the built-in node's computer.
const BUILT_IN_CLASS: &str = "hudson.model.Hudson$MasterComputer";

#[derive(Deserialize)]
struct ComputerSet {
    #[serde(default)]
    computer: Vec<Computer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Computer {
    /// Jenkins adds `_class` to every exported object, whatever the `tree`.
    #[serde(rename = "_class", default)]
    class: Option<String>,
    display_name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    offline: bool,
    #[serde(default = "yes")]
    idle: bool,
    #[serde(default)]
    assigned_labels: Vec<LabelRef>,
    #[serde(default)]
    executors: Vec<Executor>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct LabelRef {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Executor {
    #[serde(default = "yes")]
    idle: bool,
    #[serde(default)]
    current_executable: Option<Executable>,
}

#[derive(Deserialize)]
struct Executable {
    #[serde(default)]
    url: Option<String>,
}

/// Parses `computer/api/json`.
pub fn parse_computers(body: &[u8]) -> Result<Vec<NodeObs>, ParseError> {
    let set: ComputerSet = serde_json::from_slice(body).map_err(|source| ParseError::Json {
        what: "computer/api/json",
        source,
    })?;
    Ok(set
        .computer
        .into_iter()
        .map(|c| {
            let build = c
                .executors
                .iter()
                .find_map(|e| e.current_executable.as_ref().and_then(|x| x.url.clone()));
            let busy = !c.idle || c.executors.iter().any(|e| !e.idle) || build.is_some();
            let labels: Vec<String> = c.assigned_labels.into_iter().map(|l| l.name).collect();
            let marked = c
                .description
                .as_deref()
                .is_some_and(|d| d.contains(DRAINED_MARKER));
            let unlabelled = labels.iter().all(|l| *l == c.display_name);
            NodeObs {
                drained: marked || (unlabelled && !labels.is_empty()),
                built_in: c.class.as_deref() == Some(BUILT_IN_CLASS),
                name: c.display_name,
                offline: c.offline,
                build,
                busy,
                labels,
            }
        })
        .collect())
}

/// One queue item that waits for an executor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedObs {
    /// Queue id.
    pub id: u64,
    /// What it waits for, parsed from `why`.
    pub wants: Wants,
}

/// What a queue item waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    /// A node with this label (expression).
    Label(String),
    /// This node (the only node of the item's label, and it is offline or busy).
    Node(String),
}

#[derive(Deserialize)]
struct Queue {
    #[serde(default)]
    items: Vec<QueueItem>,
}

#[derive(Deserialize)]
struct QueueItem {
    #[serde(default)]
    id: u64,
    #[serde(default)]
    buildable: bool,
    #[serde(default)]
    blocked: bool,
    #[serde(default)]
    why: Option<String>,
    #[serde(default)]
    task: Option<Task>,
}

/// The queued task: a job (`AbstractProject` exports `labelExpression`, its label as entered)
/// or a Pipeline `node` block (`PlaceholderTask` exports no label).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Task {
    #[serde(default)]
    label_expression: Option<String>,
}

/// `Messages.Queue_WaitingForNextAvailableExecutor`: what Jenkins says of every buildable item
/// while it has no agent node at all (`Queue.BuildableItem.getCauseOfBlockage` drops the label
/// then), and of items without a label.
const WAITING_FOR_AN_EXECUTOR: &str = "Waiting for next available executor";

/// Parses `queue/api/json`: buildable or blocked items whose `why` names a label or node.
pub fn parse_queue(body: &[u8]) -> Result<Vec<QueuedObs>, ParseError> {
    let q: Queue = serde_json::from_slice(body).map_err(|source| ParseError::Json {
        what: "queue/api/json",
        source,
    })?;
    Ok(q.items
        .into_iter()
        .filter(|i| i.buildable || i.blocked)
        .filter_map(|i| {
            let why = i.why.as_deref()?;
            let wants = wants_of(why).or_else(|| {
                // No label named: the task's own label, if it exports one.
                let label = i.task?.label_expression?;
                let label = label.trim();
                (why.trim().trim_end_matches('.') == WAITING_FOR_AN_EXECUTOR && !label.is_empty())
                    .then(|| Wants::Label(label.to_string()))
            })?;
            Some(QueuedObs { id: i.id, wants })
        })
        .collect())
}

fn unquote(s: &str) -> &str {
    let s = s.trim().trim_end_matches('.');
    let quotes: &[char] = &['‘', '’', '\'', '"', '“', '”', '`'];
    s.trim_matches(quotes).trim()
}

/// What a `why` says the item waits for (`Queue.*` messages of Jenkins core, both the quoted
/// style of newer cores and the unquoted one of older cores).
///
/// ```
/// use warmpool::jenkins::model::{wants_of, Wants};
/// assert_eq!(wants_of("There are no nodes with the label ‘linux’"), Some(Wants::Label("linux".into())));
/// assert_eq!(wants_of("Waiting for next available executor on go"), Some(Wants::Label("go".into())));
/// assert_eq!(wants_of("‘go-1a2b’ is offline"), Some(Wants::Node("go-1a2b".into())));
/// assert_eq!(wants_of("In the quiet period. Expires in 4.9 sec"), None);
/// ```
pub fn wants_of(why: &str) -> Option<Wants> {
    let why = why.trim();
    // Composite reasons ("X is reserved for ...; Y is offline") name several nodes: the
    // label is not recoverable from them.
    if why.contains(';') {
        return None;
    }
    for p in [
        "There are no nodes with the label ",
        "Waiting for next available executor on ",
    ] {
        if let Some(rest) = why.strip_prefix(p) {
            let l = unquote(rest);
            return (!l.is_empty()).then(|| Wants::Label(l.into()));
        }
    }
    if let Some(rest) = why.strip_prefix("All nodes of label ")
        && let Some(l) = rest.strip_suffix(" are offline")
    {
        let l = unquote(l);
        return (!l.is_empty()).then(|| Wants::Label(l.into()));
    }
    if let Some(n) = why.strip_suffix(" is offline") {
        let n = unquote(n);
        return (!n.is_empty() && !n.contains(' ')).then(|| Wants::Node(n.into()));
    }
    None
}

/// The agent secret in a JNLP file: the first `<argument>` of `<application-desc>` (the second
/// is the node name, which must be `node`).
pub fn jnlp_secret(xml: &str, node: &str) -> Result<String, ParseError> {
    let desc = xml
        .find("<application-desc")
        .map(|i| &xml[i..])
        .ok_or(ParseError::NoApplicationDesc)?;
    let mut args = Vec::new();
    let mut rest = desc;
    while args.len() < 2 {
        let Some(i) = rest.find("<argument>") else {
            break;
        };
        let after = &rest[i + "<argument>".len()..];
        let j = after
            .find("</argument>")
            .ok_or(ParseError::UnterminatedArgument)?;
        args.push(xml_unescape(after[..j].trim()));
        rest = &after[j..];
    }
    match args.as_slice() {
        [secret, name] if name == node && !secret.is_empty() => Ok(secret.clone()),
        [_, name] => Err(ParseError::OtherNode {
            node: node.into(),
            found: name.clone(),
        }),
        _ => Err(ParseError::TooFewArguments),
    }
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computers() {
        let body = br#"{"_class":"hudson.model.ComputerSet","computer":[
          {"_class":"hudson.model.Hudson$MasterComputer","displayName":"Built-In Node",
           "assignedLabels":[{"name":"built-in"}],"executors":[],"idle":true,"numExecutors":0,"offline":false},
          {"_class":"hudson.slaves.SlaveComputer","displayName":"go-1",
           "assignedLabels":[{"_class":"hudson.model.labels.LabelAtom","name":"go"},{"name":"go-1"}],
           "executors":[{"_class":"hudson.model.Executor","idle":false,
             "currentExecutable":{"_class":"hudson.model.FreeStyleBuild","url":"http://j/job/x/3/"}}],
           "idle":false,"numExecutors":1,"offline":false},
          {"displayName":"go-2","executors":[{"idle":true,"currentExecutable":null}],"idle":true,"offline":true}]}"#;
        let n = parse_computers(body).unwrap();
        assert_eq!(n.len(), 3);
        assert_eq!(n[1].build.as_deref(), Some("http://j/job/x/3/"));
        assert!(n[1].busy && !n[1].offline);
        assert_eq!(n[1].labels, ["go", "go-1"]);
        assert!(!n[2].busy && n[2].offline);
        assert!(
            parse_computers(b"<html>")
                .unwrap_err()
                .to_string()
                .contains("computer/api/json")
        );
        assert!(!n[1].drained && !n[2].drained);
        assert!(n[0].built_in && !n[1].built_in && !n[2].built_in);
        // Drained: the marker in the description, or no label but the node's own name.
        let body = format!(
            r#"{{"computer":[
              {{"displayName":"go-3","description":"warmpool pool go {DRAINED_MARKER}",
                "assignedLabels":[{{"name":"go"}},{{"name":"go-3"}}]}},
              {{"displayName":"go-4","description":"warmpool pool go","assignedLabels":[{{"name":"go-4"}}]}},
              {{"displayName":"go-5","description":"warmpool pool go","assignedLabels":[{{"name":"linux"}},{{"name":"go-5"}}]}}]}}"#
        );
        let d: Vec<bool> = parse_computers(body.as_bytes())
            .unwrap()
            .iter()
            .map(|n| n.drained)
            .collect();
        assert_eq!(d, [true, true, false]);
    }

    #[test]
    fn queue_and_why() {
        let body = r#"{"_class":"hudson.model.Queue","items":[
          {"_class":"hudson.model.Queue$BuildableItem","id":18,"buildable":true,"blocked":false,
           "why":"There are no nodes with the label ‘linux’"},
          {"id":19,"buildable":true,"why":"All nodes of label ‘go && linux’ are offline"},
          {"id":20,"buildable":false,"blocked":false,"why":"In the quiet period. Expires in 4 sec"},
          {"id":21,"blocked":true,"why":"Waiting for next available executor on 'py'"},
          {"id":22,"buildable":true,"why":"Waiting for next available executor"},
          {"id":23,"buildable":true,"why":"go-abc is offline"},
          {"id":24,"buildable":true,"why":"Waiting for next available executor",
           "task":{"_class":"hudson.model.FreeStyleProject","name":"x","labelExpression":"go && linux"}},
          {"id":25,"blocked":true,"why":"Build #3 is already in progress (ETA: 1 min)",
           "task":{"labelExpression":"go"}}]}"#;
        let q = parse_queue(body.as_bytes()).unwrap();
        let w: Vec<_> = q.iter().map(|i| (i.id, i.wants.clone())).collect();
        assert_eq!(
            w,
            [
                (18, Wants::Label("linux".into())),
                (19, Wants::Label("go && linux".into())),
                (21, Wants::Label("py".into())),
                (23, Wants::Node("go-abc".into())),
                (24, Wants::Label("go && linux".into())),
            ]
        );
        assert_eq!(
            wants_of(
                "‘Jenkins’ is reserved for jobs with matching label expression; ‘ubu2’ is offline"
            ),
            None
        );
    }

    #[test]
    fn jnlp() {
        let new = "<jnlp><application-desc><argument>abc123</argument><argument>go-1</argument><argument>-webSocket</argument></application-desc></jnlp>";
        assert_eq!(jnlp_secret(new, "go-1").unwrap(), "abc123");
        let old = r#"<?xml version="1.0" encoding="UTF-8"?>
<jnlp spec="1.0+" codebase="http://j/computer/go-1/"><information><title>Agent</title></information>
<application-desc main-class="hudson.remoting.jnlp.Main">
  <argument>s3cr3t</argument>
  <argument>go-1</argument>
  <argument>-url</argument><argument>http://j/</argument>
</application-desc></jnlp>"#;
        assert_eq!(jnlp_secret(old, "go-1").unwrap(), "s3cr3t");
        assert!(
            jnlp_secret(old, "go-2")
                .unwrap_err()
                .to_string()
                .contains("go-2")
        );
        assert!(jnlp_secret("<html/>", "go-1").is_err());
    }
}
