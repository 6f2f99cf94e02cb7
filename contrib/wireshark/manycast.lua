-- manycast.lua: a Wireshark dissector for manycast's join extensions and control messages.
--
--   wireshark -X lua_script:contrib/wireshark/manycast.lua capture.pcapng
--   tshark -X lua_script:contrib/wireshark/manycast.lua -r capture.pcapng -V -Y manycast
--
-- 1. Joins: IGMPv3 membership reports (RFC 3376) and MLDv2 reports (RFC 3810, ICMPv6
--    type 143) whose flags field has the E bit (0x8000, RFC 9279) carry TLVs after the
--    last record. manycast uses the two experimental types
--    (src/manycast/wire/membership.py; W is 4 bytes for IGMP, 16 for MLD):
--      65534 GROUP MASKS  record-index(16) include-count(16) group(W)
--                         include-count x (value(W) mask(W)), then exclude pairs
--      65535 SIGNED JOIN  timestamp-ms(64) requester(W) generation(32) part(16) parts(16)
--                         key-length(16) random-key signature
--    (a report too long for one packet goes as parts 0 to parts-1 of one generation)
--    Wireshark's IGMP or ICMPv6 dissector shows the records; this one runs after it on
--    the same packet and adds a "manycast join extensions" tree with every mask pair
--    and the signed-join fields.
-- 2. Control messages: UDP to the pool's control port (7946 by default; a preference)
--    (src/manycast/wire/control/): the envelope "MC" version(8) type(8) sender-length(8)
--    sender seq(32), then the body; the coordination messages' bodies are decoded, the
--    others shown as bytes.

local EXT_FLAG = 0x8000
local EXT_GROUP_MASKS = 65534
local EXT_SIGNED_JOIN = 65535

-- 1. join extensions ---------------------------------------------------------------------

local joins = Proto("manycast", "manycast join extensions (RFC 9279 TLVs)")
local jf = {
  tlv_type = ProtoField.uint16("manycast.tlv.type", "TLV type", base.DEC, {
    [EXT_GROUP_MASKS] = "group masks",
    [EXT_SIGNED_JOIN] = "signed join",
  }),
  tlv_length = ProtoField.uint16("manycast.tlv.length", "TLV length", base.DEC),
  record = ProtoField.uint16("manycast.masks.record", "Record index", base.DEC),
  include_count = ProtoField.uint16("manycast.masks.include_count", "Include pairs", base.DEC),
  group = ProtoField.ipv4("manycast.masks.group", "Group"),
  group6 = ProtoField.ipv6("manycast.masks.group6", "Group"),
  include = ProtoField.string("manycast.masks.include", "Include mask pair"),
  exclude = ProtoField.string("manycast.masks.exclude", "Exclude mask pair"),
  value = ProtoField.ipv4("manycast.masks.value", "Value"),
  mask = ProtoField.ipv4("manycast.masks.mask", "Mask"),
  value6 = ProtoField.ipv6("manycast.masks.value6", "Value"),
  mask6 = ProtoField.ipv6("manycast.masks.mask6", "Mask"),
  timestamp = ProtoField.uint64("manycast.signed.timestamp_ms", "Timestamp (ms since epoch)"),
  requester = ProtoField.ipv4("manycast.signed.requester", "Requester"),
  requester6 = ProtoField.ipv6("manycast.signed.requester6", "Requester"),
  generation = ProtoField.uint32("manycast.signed.generation", "Report generation", base.DEC),
  part = ProtoField.uint16("manycast.signed.part", "Part", base.DEC),
  parts = ProtoField.uint16("manycast.signed.parts", "Parts", base.DEC),
  key_length = ProtoField.uint16("manycast.signed.key_length", "Random key length", base.DEC),
  random_key = ProtoField.bytes("manycast.signed.random_key", "Random key"),
  signature = ProtoField.bytes("manycast.signed.signature", "Signature"),
  unknown = ProtoField.bytes("manycast.tlv.value", "Value"),
}
joins.fields = jf
local e_bad = ProtoExpert.new("manycast.bad", "manycast extension does not decode",
  expert.group.MALFORMED, expert.severity.ERROR)
joins.experts = { e_bad }

-- The two report families: address width and the fields that show an address.
local IGMP = { report = 0x22, w = 4, group = jf.group, value = jf.value, mask = jf.mask,
  requester = jf.requester, addr = function(range) return range:ipv4() end }
local MLD = { report = 143, w = 16, group = jf.group6, value = jf.value6, mask = jf.mask6,
  requester = jf.requester6, addr = function(range) return range:ipv6() end }

local function pair_text(fam, tvb, off)
  local value = fam.addr(tvb(off, fam.w))
  local mask = fam.addr(tvb(off + fam.w, fam.w))
  return tostring(value) .. "/" .. tostring(mask)
end

local function mask_tlv(fam, tvb, tree, off, len)
  local w = fam.w
  if len < 4 + w or (len - 4 - w) % (2 * w) ~= 0 then
    tree:add_proto_expert_info(e_bad, "group masks TLV of " .. len .. " bytes")
    return
  end
  local includes = tvb(off + 2, 2):uint()
  local pairs = (len - 4 - w) / (2 * w)
  tree:add(jf.record, tvb(off, 2))
  tree:add(jf.include_count, tvb(off + 2, 2))
  tree:add(fam.group, tvb(off + 4, w))
  tree:append_text(": record " .. tvb(off, 2):uint() .. ", group "
    .. tostring(fam.addr(tvb(off + 4, w))) .. ", " .. includes .. " include, "
    .. (pairs - includes) .. " exclude")
  for i = 0, pairs - 1 do
    local at = off + 4 + w + 2 * w * i
    local field = (i < includes) and jf.include or jf.exclude
    local item = tree:add(field, tvb(at, 2 * w), pair_text(fam, tvb, at))
    item:add(fam.value, tvb(at, w))
    item:add(fam.mask, tvb(at + w, w))
  end
end

local function signed_tlv(fam, tvb, tree, off, len)
  local w = fam.w
  local fixed = 18 + w  -- timestamp, requester, generation, part, parts, key length
  if len < fixed then
    tree:add_proto_expert_info(e_bad, "signed join TLV of " .. len .. " bytes")
    return
  end
  local ms = tvb(off, 8):uint64()
  local item = tree:add(jf.timestamp, tvb(off, 8))
  local seconds = (ms / 1000):tonumber()
  item:append_text(" (" .. os.date("!%Y-%m-%d %H:%M:%S", seconds) .. " UTC)")
  local at = off + 8 + w
  tree:add(fam.requester, tvb(off + 8, w))
  tree:add(jf.generation, tvb(at, 4))
  tree:add(jf.part, tvb(at + 4, 2))
  tree:add(jf.parts, tvb(at + 6, 2))
  local part, parts = tvb(at + 4, 2):uint(), tvb(at + 6, 2):uint()
  local klen = tvb(at + 8, 2):uint()
  tree:add(jf.key_length, tvb(at + 8, 2))
  if fixed + klen > len then
    tree:add_proto_expert_info(e_bad, "random key runs past the TLV")
    return
  end
  if klen > 0 then
    tree:add(jf.random_key, tvb(off + fixed, klen))
  end
  if len > fixed + klen then
    tree:add(jf.signature, tvb(off + fixed + klen, len - fixed - klen))
  end
  local split = ""
  if parts > 1 then
    split = ", part " .. part .. " of parts 0-" .. (parts - 1)
  end
  tree:append_text(": requester " .. tostring(fam.addr(tvb(off + 8, w))) .. ", signed "
    .. os.date("!%Y-%m-%d %H:%M:%S", seconds) .. " UTC" .. split)
end

-- Where a report's records end and its TLVs begin, or nil when it has none.
local function extensions_at(fam, tvb)
  if tvb:len() < 8 or tvb(0, 1):uint() ~= fam.report then return nil end
  if bit.band(tvb(4, 2):uint(), EXT_FLAG) == 0 then return nil end
  local off = 8
  for _ = 1, tvb(6, 2):uint() do
    if off + 4 + fam.w > tvb:len() then return nil end
    local aux = tvb(off + 1, 1):uint()
    local sources = tvb(off + 2, 2):uint()
    off = off + 4 + fam.w + fam.w * sources + 4 * aux
  end
  if off >= tvb:len() then return nil end
  return off
end

-- The extensions of a report (`tvb` starts at the IGMP or ICMPv6 message).
local function join_extensions(fam, tvb, pinfo, tree, off, records_only)
  local subtree = tree:add(joins, tvb(off))
  if records_only then
    subtree:append_text(" (the checksum covers them too: Wireshark's check saw the records only)")
  end
  local masks, signed = 0, false
  while off + 4 <= tvb:len() do
    local kind, len = tvb(off, 2):uint(), tvb(off + 2, 2):uint()
    if off + 4 + len > tvb:len() then
      subtree:add_proto_expert_info(e_bad, "TLV runs past the report")
      return
    end
    local name = (kind == EXT_GROUP_MASKS and "Group masks")
      or (kind == EXT_SIGNED_JOIN and "Signed join") or ("TLV " .. kind)
    local t = subtree:add(tvb(off, 4 + len), name)
    t:add(jf.tlv_type, tvb(off, 2))
    t:add(jf.tlv_length, tvb(off + 2, 2))
    if kind == EXT_GROUP_MASKS then
      mask_tlv(fam, tvb, t, off + 4, len)
      masks = masks + 1
    elseif kind == EXT_SIGNED_JOIN then
      signed_tlv(fam, tvb, t, off + 4, len)
      signed = true
    elseif len > 0 then
      t:add(jf.unknown, tvb(off + 4, len))
    end
    off = off + 4 + len
  end
  pinfo.cols.info:append(" [manycast: " .. masks .. " mask TLV" .. (masks == 1 and "" or "s")
    .. (signed and ", signed join]" or "]"))
end

-- Wireshark's IGMP and ICMPv6 dissectors first, then the extensions, for every IGMP
-- and ICMPv6 packet (IPv6's next header goes through the same table). Wireshark's
-- MLDv2 dissector reads records to the end of the message whatever their count, so
-- it gets the records only (its checksum then covers less than was sent and shows
-- as incorrect); IGMP's stops at the count and gets the whole message.
local ip_proto = DissectorTable.get("ip.proto")
local function after(number, fam, name, text, records_only)
  local base_dissector = ip_proto:get_dissector(number)
  local wrapped = Proto(name, text)
  function wrapped.dissector(tvb, pinfo, tree)
    local off = extensions_at(fam, tvb)
    local base_tvb = tvb
    if off ~= nil and records_only then base_tvb = tvb(0, off):tvb() end
    local consumed = base_dissector:call(base_tvb, pinfo, tree)
    if off ~= nil then
      join_extensions(fam, tvb, pinfo, tree, off, records_only)
      consumed = tvb:len()
    end
    return consumed
  end
  ip_proto:add(number, wrapped)
end
after(2, IGMP, "manycast_igmp", "IGMP with manycast extensions", false)
after(58, MLD, "manycast_mld", "ICMPv6 with manycast extensions", true)

-- 2. control messages ----------------------------------------------------------------------

local control = Proto("manycast_control", "manycast control message")
local TYPES = {
  [1] = "Heartbeat", [2] = "Command", [3] = "Proposal", [4] = "Ack", [5] = "Commit",
  [6] = "SnapshotRequest", [7] = "Snapshot", [8] = "Forwarded", [9] = "Redirect",
  [10] = "StateQuery", [11] = "StateReply", [14] = "ServerHello", [15] = "LabelMapping",
  [16] = "FlowTag", [17] = "FlowUntag", [18] = "VipAdvert", [19] = "LoadReport",
  [20] = "MoveConnection", [21] = "MoveAck", [22] = "MemberDown", [23] = "Probe",
  [24] = "MemberNotice",
}
local STATES = { [1] = "joining", [2] = "active", [3] = "leaving" }
local cf = {
  magic = ProtoField.string("manycast_control.magic", "Magic"),
  version = ProtoField.uint8("manycast_control.version", "Version", base.DEC),
  type = ProtoField.uint8("manycast_control.type", "Type", base.DEC, TYPES),
  sender = ProtoField.string("manycast_control.sender", "Sender"),
  seq = ProtoField.uint32("manycast_control.seq", "Sequence", base.DEC),
  epoch = ProtoField.uint64("manycast_control.epoch", "Epoch"),
  base_epoch = ProtoField.uint64("manycast_control.base_epoch", "Base epoch"),
  digest = ProtoField.bytes("manycast_control.digest", "Allocation digest"),
  base_digest = ProtoField.bytes("manycast_control.base_digest", "Base digest"),
  state = ProtoField.uint8("manycast_control.state", "State", base.DEC, STATES),
  address = ProtoField.ipv4("manycast_control.address", "Address"),
  load = ProtoField.double("manycast_control.load", "Load (requests/s)"),
  sessions = ProtoField.uint32("manycast_control.sessions", "Sessions", base.DEC),
  interval = ProtoField.uint32("manycast_control.interval_ms", "Interval (ms)", base.DEC),
  delay = ProtoField.uint32("manycast_control.delay_ms", "Delay (ms)", base.DEC),
  hold = ProtoField.uint32("manycast_control.hold_ms", "Hold (ms)", base.DEC),
  vip = ProtoField.ipv4("manycast_control.vip", "VIP"),
  body = ProtoField.bytes("manycast_control.body", "Body"),
}
control.fields = cf
local port_pref = Pref.uint("Control port", 7946, "The pools' control UDP port")
control.prefs.port = port_pref

-- An address field: family(8) then 4 bytes (IPv4) or 16; its length.
local function address(tvb, tree, off, field)
  if tvb(off, 1):uint() == 4 then
    tree:add(field, tvb(off + 1, 4))
    return 5
  end
  tree:add(cf.body, tvb(off, 17))
  return 17
end

local BODIES = {
  [1] = function(tvb, tree, off) -- Heartbeat
    tree:add(cf.epoch, tvb(off, 8)); tree:add(cf.digest, tvb(off + 8, 8))
    tree:add(cf.state, tvb(off + 16, 1))
    off = off + 17 + address(tvb, tree, off + 17, cf.address)
    tree:add(cf.load, tvb(off, 8)); tree:add(cf.sessions, tvb(off + 8, 4))
    tree:add(cf.interval, tvb(off + 12, 4))
  end,
  [3] = function(tvb, tree, off) -- Proposal (the op follows, shown as bytes)
    tree:add(cf.epoch, tvb(off, 8)); tree:add(cf.base_epoch, tvb(off + 8, 8))
    tree:add(cf.base_digest, tvb(off + 16, 8)); tree:add(cf.digest, tvb(off + 24, 8))
    tree:add(cf.delay, tvb(off + 32, 4))
    if tvb:len() > off + 36 then tree:add(cf.body, tvb(off + 36)) end
  end,
  [4] = function(tvb, tree, off) -- Ack
    tree:add(cf.epoch, tvb(off, 8)); tree:add(cf.digest, tvb(off + 8, 8))
  end,
  [5] = function(tvb, tree, off) -- Commit
    tree:add(cf.epoch, tvb(off, 8)); tree:add(cf.digest, tvb(off + 8, 8))
  end,
  [6] = function(tvb, tree, off) -- SnapshotRequest
    tree:add(cf.epoch, tvb(off, 8))
  end,
  [14] = function(tvb, tree, off) -- ServerHello
    off = off + address(tvb, tree, off, cf.address)
    off = off + address(tvb, tree, off, cf.vip)
    tree:add(cf.hold, tvb(off, 4))
  end,
  [18] = function(tvb, tree, off) -- VipAdvert
    off = off + address(tvb, tree, off, cf.vip)
    off = off + address(tvb, tree, off, cf.address)
    tree:add(cf.hold, tvb(off, 4))
  end,
  [19] = function(tvb, tree, off) -- LoadReport
    off = off + address(tvb, tree, off, cf.address)
    tree:add(cf.load, tvb(off, 8)); tree:add(cf.sessions, tvb(off + 8, 4))
  end,
}

function control.dissector(tvb, pinfo, tree)
  if tvb:len() < 9 or tvb(0, 2):string() ~= "MC" then return 0 end
  local kind = tvb(3, 1):uint()
  local slen = tvb(4, 1):uint()
  if tvb:len() < 9 + slen then return 0 end
  local name = TYPES[kind] or ("type " .. kind)
  local sender = tvb(5, slen):string()
  pinfo.cols.protocol = "manycast"
  pinfo.cols.info = name .. " from " .. sender .. " seq " .. tvb(5 + slen, 4):uint()
  local subtree = tree:add(control, tvb(), "manycast control: " .. name .. " from " .. sender)
  subtree:add(cf.magic, tvb(0, 2)); subtree:add(cf.version, tvb(2, 1))
  subtree:add(cf.type, tvb(3, 1)); subtree:add(cf.sender, tvb(5, slen))
  subtree:add(cf.seq, tvb(5 + slen, 4))
  local body = 9 + slen
  local decode = BODIES[kind]
  -- A body too short for its type is shown raw (the pool's decoder refuses it too).
  if decode == nil or not pcall(decode, tvb, subtree, body) then
    if tvb:len() > body then subtree:add(cf.body, tvb(body)) end
  end
  return tvb:len()
end

local udp_port = DissectorTable.get("udp.port")
local registered = 7946
udp_port:add(registered, control)
function control.prefs_changed()
  if control.prefs.port ~= registered then
    udp_port:remove(registered, control)
    registered = control.prefs.port
    udp_port:add(registered, control)
  end
end
